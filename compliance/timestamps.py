"""RFC 3161 trusted timestamps: a local timestamp authority, a client for an external TSA, token verification.

Why timestamps at all: the brief asks that a 时间戳服务器固化签署时间 — a timestamp server fixes the moment a
consent or remote-consultation authorisation was signed. The Ed25519 signature on a call record or consent
proves *who* signed *what*, but the time inside it is the business server's clock, which whoever runs that
server can set to anything. An RFC 3161 token is a second signature, by a timestamp authority (TSA), over the
SHA-256 of the signed object and the TSA's own time; with a TSA independent of the hotline, the signing time
no longer rests on the business server's clock. Stamp the SHA-256 of the *signature bytes* (as CAdES does with
its signature-time-stamp): the token then proves the signature existed at ``genTime``, and the signature binds
the content.

Why the local authority is only the embedded default: :class:`LocalTimestampAuthority` keeps its key next to
the hotline's other keys, so its tokens are worth exactly as much as the key service's protection — they
order and date records against later tampering by anyone without that key, but the time is still the
hotline host's own. A hospital that must show the time to a court configures a qualified TSA's URL, and
:class:`HttpTimestampClient` is used instead. Both speak the same protocol and produce the same kind of token,
so :func:`verify_token` (and ``openssl ts -verify``) check either; only the trusted certificates differ.

Why ECDSA P-256 for the local TSA: it is what OpenSSL, Java's, .NET's and the PDF/CAdES verifiers all accept
in CMS SignedData (Ed25519 in CMS, RFC 8419, is still missing from many of them), with short signatures and
fast signing. Verification here also accepts RSA (PKCS#1 v1.5 and PSS) and Ed25519, the keys external TSAs
use.

The tokens are plain RFC 3161 / RFC 5816: a CMS SignedData whose eContent is a TSTInfo, signed attributes
content-type, message-digest, signing-time and ESS signing-certificate-v2 (which binds the signature to the
TSA certificate, so a second certificate for the same key cannot be substituted).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import stat
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final, Protocol

import httpx
from asn1crypto import cms, core, tsp  # type: ignore[import-untyped]
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ground.errors import MedhotlineError

__all__ = [
    "POLICY_OID",
    "HttpTimestampClient",
    "LocalTimestampAuthority",
    "LocalTimestamper",
    "TimestampError",
    "TimestampInfo",
    "TimestampPort",
    "make_request",
    "token_from_response",
    "verify_token",
]

#: The TSA policy the local authority stamps under. An OID under a private enterprise arc that is not the
#: hospital's: replace with the hospital's own policy OID (its IANA enterprise number) when it documents one.
POLICY_OID: Final = "1.3.6.1.4.1.99999.1.1"

#: The local TSA certificate's lifetime: records are kept 15-30 years and a token is checked against the
#: certificate's validity at ``genTime``; 30 years covers any record stamped in the certificate's first year
#: and its later re-verification.
CERT_VALIDITY: Final = timedelta(days=30 * 365 + 8)

SHA256_LEN: Final = 32
NONCE_BITS: Final = 64  # RFC 3161 §2.4.1: a large random number; 64 bits is what OpenSSL sends
SERIAL_BITS: Final = 128
MAX_REPLY_BYTES: Final = 256 * 1024  # a token with a certificate chain is a few KiB; refuse a flood
QUERY_TYPE: Final = "application/timestamp-query"
REPLY_TYPE: Final = "application/timestamp-reply"

_GRANTED: Final = frozenset({"granted", "granted_with_mods"})
_FAIL_INFO_NAMES: Final = {
    "bad_alg": "badAlg",
    "bad_request": "badRequest",
    "bad_data_format": "badDataFormat",
    "time_not_available": "timeNotAvailable",
    "unaccepted_policy": "unacceptedPolicy",
    "unaccepted_extensions": "unacceptedExtension",
    "add_info_not_available": "addInfoNotAvailable",
    "system_failure": "systemFailure",
}
_HASHES: Final[dict[str, type[hashes.HashAlgorithm]]] = {
    "sha224": hashes.SHA224,
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}
# asn1crypto raises these (and only these, in practice) when lazily parsing bytes that are not the expected DER.
_PARSE_ERRORS: Final = (ValueError, TypeError, KeyError, IndexError, OverflowError)


class _TimeStampResp(tsp.TimeStampResp):  # type: ignore[misc]
    """RFC 3161 §2.4.2's TimeStampResp: asn1crypto 1.5 forgets that a rejection carries no token."""

    _fields: Final = [
        ("status", tsp.PKIStatusInfo),
        ("time_stamp_token", cms.ContentInfo, {"optional": True}),
    ]


class TimestampError(MedhotlineError):
    """A request, response or token that fails a check; the message names the check."""


# --- request ---------------------------------------------------------------------------------------------------


def make_request(digest: bytes, *, nonce: int | None = None, cert_req: bool = True) -> bytes:
    """A DER TimeStampReq (version 1) for a SHA-256 ``digest``, with ``nonce`` if given."""
    if len(digest) != SHA256_LEN:
        raise TimestampError(f"a SHA-256 digest is {SHA256_LEN} bytes, not {len(digest)}")
    fields: dict[str, Any] = {
        "version": "v1",
        "message_imprint": {"hash_algorithm": {"algorithm": "sha256"}, "hashed_message": digest},
    }
    if nonce is not None:
        if nonce < 0:
            raise TimestampError("a nonce is a non-negative integer")
        fields["nonce"] = nonce
    if cert_req:  # DER leaves out a BOOLEAN equal to its DEFAULT FALSE
        fields["cert_req"] = True
    return bytes(tsp.TimeStampReq(fields).dump())


# --- local authority -------------------------------------------------------------------------------------------


class _Rejected(Exception):
    """Inside :meth:`LocalTimestampAuthority.respond`: the request is answered with status rejection."""

    def __init__(self, fail_info: str, text: str) -> None:
        super().__init__(text)
        self.fail_info = fail_info
        self.text = text


class LocalTimestampAuthority:
    """The embedded TSA: an ECDSA P-256 key and a self-signed timeStamping certificate in ``directory``.

    Safe to share between threads: after loading it holds only immutable state (the key and certificate
    objects, which OpenSSL signs with through a fresh context per call), and :meth:`respond` builds every
    structure per call; serials come from :mod:`secrets`.
    """

    KEY_FILE: Final = "tsa.key.pem"
    CERT_FILE: Final = "tsa.cert.pem"

    def __init__(self, private_key: ec.EllipticCurvePrivateKey, certificate: x509.Certificate) -> None:
        if certificate.public_key() != private_key.public_key():
            raise TimestampError("the TSA certificate does not belong to the TSA private key")
        self._key = private_key
        self._cert = certificate
        self._cert_der = certificate.public_bytes(serialization.Encoding.DER)
        # DER kept as bytes and parsed afresh per token: asn1crypto re-encodes a structure once it has been
        # explored, which is slow and, for a value hashed elsewhere, a needless risk.
        self._subject_der = certificate.subject.public_bytes()
        self._issuer_der = certificate.issuer.public_bytes()
        issuer_name = asn1_x509.GeneralName({"directory_name": asn1_x509.Name.load(self._issuer_der)})
        ess_cert_id = {
            # hash_algorithm left at its DEFAULT, SHA-256 (RFC 5035), so DER omits it
            "cert_hash": hashlib.sha256(self._cert_der).digest(),
            "issuer_serial": {"issuer": [issuer_name], "serial_number": certificate.serial_number},
        }
        ess_cert_id_der = _dump(tsp.ESSCertIDv2(ess_cert_id))
        self._ess_der = _dump(tsp.SigningCertificateV2({"certs": [tsp.ESSCertIDv2.load(ess_cert_id_der)]}))
        self._sid_der = _dump(
            cms.SignerIdentifier(
                {
                    "issuer_and_serial_number": {
                        "issuer": asn1_x509.Name.load(self._issuer_der),
                        "serial_number": certificate.serial_number,
                    }
                }
            )
        )

    @classmethod
    def load_or_create(cls, directory: Path, *, name: str = "medhotline local TSA") -> LocalTimestampAuthority:
        """Load the key and certificate in ``directory``, creating whichever is missing (key first).

        Files are published by hard-linking a complete temporary file, so a second process starting at the
        same moment either wins or loads the winner's file, never a half-written one.
        """
        with contextlib.suppress(FileExistsError):
            directory.mkdir(mode=0o700, parents=True)
            directory.chmod(0o700)  # mkdir's mode passes through the umask
        key_path = directory / cls.KEY_FILE
        cert_path = directory / cls.CERT_FILE
        if not key_path.exists():
            if cert_path.exists():
                raise TimestampError(f"{cert_path}: a TSA certificate without its private key {key_path.name}")
            key = ec.generate_private_key(ec.SECP256R1())
            pem = key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            _publish(key_path, pem)
        key = _load_private_key(key_path)
        if not cert_path.exists():
            cert = _self_signed_certificate(key, name, datetime.now(UTC))
            _publish(cert_path, cert.public_bytes(serialization.Encoding.PEM))
        cert = _load_certificate(cert_path)
        if cert.public_key() != key.public_key():
            raise TimestampError(f"{cert_path}: the certificate does not belong to the private key {key_path.name}")
        return cls(key, cert)

    @property
    def certificate(self) -> x509.Certificate:
        return self._cert

    @property
    def certificate_pem(self) -> bytes:
        return self._cert.public_bytes(serialization.Encoding.PEM)

    def respond(self, request_der: bytes, *, now: datetime | None = None) -> bytes:
        """Answer a DER TimeStampReq with a DER TimeStampResp; a bad request gets status rejection, not an error."""
        if now is not None and now.utcoffset() is None:
            raise TimestampError("respond(now=...) needs a timezone-aware datetime")
        gen_time = (now or datetime.now(UTC)).astimezone(UTC)
        gen_time = gen_time.replace(microsecond=gen_time.microsecond // 1000 * 1000)  # milliseconds in DER
        try:
            request = _parse_request(request_der)
        except _Rejected as rejected:
            response = _TimeStampResp(
                {
                    "status": {
                        "status": "rejection",
                        "status_string": [rejected.text],
                        "fail_info": tsp.PKIFailureInfo({rejected.fail_info}),
                    }
                }
            )
            return bytes(response.dump())
        token = self._token(request, gen_time)
        return bytes(_TimeStampResp({"status": {"status": "granted"}, "time_stamp_token": token}).dump())

    def _token(self, request: _Request, gen_time: datetime) -> Any:
        tst_fields: dict[str, Any] = {
            "version": "v1",
            "policy": POLICY_OID,
            "message_imprint": tsp.MessageImprint.load(request.imprint_der),  # the request's, byte for byte
            "serial_number": _new_serial(),
            "gen_time": core.GeneralizedTime(gen_time),
            "tsa": asn1_x509.GeneralName({"directory_name": asn1_x509.Name.load(self._subject_der)}),
        }
        if request.nonce is not None:
            tst_fields["nonce"] = request.nonce
        tst_der = _dump(tsp.TSTInfo(tst_fields))
        attrs_der = _dump(
            cms.CMSAttributes(
                [
                    {"type": "content_type", "values": ["tst_info"]},
                    {"type": "signing_time", "values": [_cms_time(gen_time)]},
                    {"type": "message_digest", "values": [hashlib.sha256(tst_der).digest()]},
                    {"type": "signing_certificate_v2", "values": [tsp.SigningCertificateV2.load(self._ess_der)]},
                ]
            )
        )
        # RFC 5652 §5.4: the signature covers the DER of the attributes as a SET OF (tag 0x31), not as [0].
        signature = self._key.sign(attrs_der, ec.ECDSA(hashes.SHA256()))
        signer_info = cms.SignerInfo(
            {
                "version": "v1",
                "sid": cms.SignerIdentifier.load(self._sid_der),
                "digest_algorithm": {"algorithm": "sha256"},
                "signed_attrs": cms.CMSAttributes.load(attrs_der),
                "signature_algorithm": {"algorithm": "sha256_ecdsa"},
                "signature": signature,
            }
        )
        signed_fields: dict[str, Any] = {
            "version": "v3",  # eContentType other than id-data (RFC 5652 §5.1)
            "digest_algorithms": [{"algorithm": "sha256"}],
            "encap_content_info": {"content_type": "tst_info", "content": cms.ParsableOctetString(tst_der)},
            "signer_infos": [cms.SignerInfo.load(_dump(signer_info))],
        }
        if request.cert_req:
            # A fresh, untouched parse dumps its original bytes: the ones the ESS attribute hashed.
            signed_fields["certificates"] = [asn1_x509.Certificate.load(self._cert_der)]
        signed_data = cms.SignedData.load(_dump(cms.SignedData(signed_fields)))
        return cms.ContentInfo.load(_dump(cms.ContentInfo({"content_type": "signed_data", "content": signed_data})))


def _dump(value: Any) -> bytes:
    """DER of a structure built from Python values.

    Each layer is dumped and re-loaded before it is nested in the next: asn1crypto re-encodes every built
    child each time a parent asks for its contents, which made a token take tens of milliseconds; a loaded
    value just returns its bytes.
    """
    return bytes(value.dump())


@dataclass(frozen=True)
class _Request:
    imprint_der: bytes
    nonce: int | None
    cert_req: bool


def _parse_request(request_der: bytes) -> _Request:
    """The checked TimeStampReq, or :class:`_Rejected` with the failInfo RFC 3161 §2.4.2 assigns."""
    try:
        request = tsp.TimeStampReq.load(request_der, strict=True)
        imprint_der = bytes(request["message_imprint"].dump())  # before its children are explored
        imprint = tsp.MessageImprint.load(imprint_der, strict=True)
        algorithm = imprint["hash_algorithm"]["algorithm"].native
        hashed = imprint["hashed_message"].native
        version = request["version"].native
        nonce = None if isinstance(request["nonce"], core.Void) else int(request["nonce"].native)
        cert_req = bool(request["cert_req"].native)
        policy = None if isinstance(request["req_policy"], core.Void) else request["req_policy"].dotted
        has_extensions = not isinstance(request["extensions"], core.Void)
    except _PARSE_ERRORS:
        raise _Rejected("bad_data_format", "the request is not a DER TimeStampReq") from None
    if version != "v1":
        raise _Rejected("bad_data_format", f"the request has version {version}; RFC 3161 defines v1")
    if algorithm != "sha256":
        raise _Rejected("bad_alg", f"the message imprint uses {algorithm}; this TSA accepts SHA-256 only")
    if len(hashed) != SHA256_LEN:
        raise _Rejected("bad_data_format", f"the SHA-256 message imprint has {len(hashed)} bytes, not 32")
    if policy is not None and policy != POLICY_OID:
        raise _Rejected("unaccepted_policy", f"this TSA stamps under policy {POLICY_OID} only, not {policy}")
    if has_extensions:
        raise _Rejected("unaccepted_extensions", "this TSA supports no request extensions")
    return _Request(imprint_der=imprint_der, nonce=nonce, cert_req=cert_req)


def _new_serial() -> int:
    """A random positive 128-bit serial: unique without shared state across threads, processes and restarts."""
    while True:
        serial = secrets.randbits(SERIAL_BITS)
        if serial:
            return serial


def _cms_time(moment: datetime) -> Any:
    """RFC 5652 §11.3: signing-time is UTCTime for 1950-2049 and GeneralizedTime otherwise, whole seconds."""
    moment = moment.replace(microsecond=0)
    if 1950 <= moment.year < 2050:
        return cms.Time({"utc_time": core.UTCTime(moment)})
    return cms.Time({"generalized_time": core.GeneralizedTime(moment)})


def _self_signed_certificate(key: ec.EllipticCurvePrivateKey, name: str, now: datetime) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    # A minute back: a token stamped right after creation on a host whose clock was just stepped still falls
    # inside the validity.
    not_before = now.replace(microsecond=0) - timedelta(minutes=1)
    public_key = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_before + CERT_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=True,  # nonRepudiation
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.TIME_STAMPING]), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .sign(key, hashes.SHA256())
    )


def _publish(path: Path, data: bytes) -> None:
    """Create ``path`` (mode 0600) holding ``data`` unless it exists; a concurrent creator's file wins."""
    try:
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mkstemp creates it 0600
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            with contextlib.suppress(FileExistsError):  # another process published first: its file stands
                os.link(tmp, path)
        finally:
            tmp.unlink()
    except OSError as exc:
        raise TimestampError(f"{path}: cannot create it: {exc.strerror or exc}") from None


def _load_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise TimestampError(f"{path}: the TSA private key is readable by others (mode {mode:04o}); chmod 600 it")
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise TimestampError(f"{path}: cannot read the TSA private key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise TimestampError(f"{path}: not an ECDSA P-256 private key")
    return key


def _load_certificate(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise TimestampError(f"{path}: cannot read the TSA certificate: {exc}") from None


# --- response --------------------------------------------------------------------------------------------------


def token_from_response(response_der: bytes, request_der: bytes) -> bytes:
    """The DER TimeStampToken (a CMS ContentInfo) in a granted response that answers ``request_der``.

    Checks the status, that the token's imprint and nonce are the request's, the policy when the request
    named one, and the TSA certificate's presence when the request asked for it. The signature is left to
    :func:`verify_token`, which needs the trusted certificates.
    """
    try:
        request = tsp.TimeStampReq.load(request_der, strict=True)
        req_algorithm = str(request["message_imprint"]["hash_algorithm"]["algorithm"].native)
        req_digest = bytes(request["message_imprint"]["hashed_message"].native)
        req_nonce = request["nonce"].native
        req_policy = None if isinstance(request["req_policy"], core.Void) else request["req_policy"].dotted
        cert_req = bool(request["cert_req"].native)
    except _PARSE_ERRORS:
        raise TimestampError("the request is not a DER TimeStampReq") from None
    try:
        response = _TimeStampResp.load(response_der, strict=True)
        status = response["status"]["status"].native
        texts = response["status"]["status_string"].native or []
        fail_info = response["status"]["fail_info"].native or set()
    except _PARSE_ERRORS:
        raise TimestampError("the response is not a DER TimeStampResp") from None
    if status not in _GRANTED:
        reasons = [str(text) for text in texts]
        reasons += [f"failInfo {_FAIL_INFO_NAMES.get(str(bit), str(bit))}" for bit in sorted(fail_info)]
        raise TimestampError(f"the TSA answered with status {status}: {'; '.join(reasons) or 'no reason given'}")
    try:
        token = response["time_stamp_token"]
        if isinstance(token, core.Void):
            raise TimestampError(f"the TSA answered with status {status} but no TimeStampToken")
        token_der = bytes(token.dump())  # untouched so far: the bytes as the TSA sent them
        parsed = _parse_token(token_der)
    except _PARSE_ERRORS:
        raise TimestampError("not a DER TimeStampToken") from None
    # Algorithm and hash, not the DER: a TSA may echo SHA-256 with its NULL parameters dropped (RFC 5754).
    if (parsed.imprint_algorithm, parsed.imprint) != (req_algorithm, req_digest):
        raise TimestampError("the token's message imprint differs from the request's")
    if parsed.nonce != req_nonce:
        raise TimestampError("the response's nonce differs from the request's")
    if req_policy is not None and parsed.policy != req_policy:
        raise TimestampError(f"the token's policy {parsed.policy} differs from the requested {req_policy}")
    if cert_req and not parsed.certificates:
        raise TimestampError("the request asked for the TSA certificate but the token does not include it")
    return token_der


# --- verification ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TimestampInfo:
    """What a verified token attests: ``gen_time`` is the TSA's time for the stamped digest."""

    gen_time: datetime
    serial: int
    policy: str
    tsa: str  # the signer certificate's subject, RFC 4514
    tsa_certificate_sha256: str  # hex, for pinning and for the audit trail


@dataclass(frozen=True)
class _ParsedToken:
    """The pieces of a TimeStampToken the checks need, pulled out of asn1crypto's lazy objects at once."""

    tst_der: bytes
    imprint_algorithm: str
    imprint: bytes
    gen_time: datetime
    serial: int
    policy: str
    nonce: int | None
    certificates: tuple[bytes, ...]
    sid_issuer_serial: tuple[bytes, int] | None
    sid_key_id: bytes | None
    digest_algorithm: str
    signed_attrs_der: bytes
    attributes: dict[str, list[Any]]
    signature_algorithm: Any
    signature: bytes


def _parse_token(token_der: bytes) -> _ParsedToken:
    """Parse and flatten a token; raises one of _PARSE_ERRORS or TimestampError for a structural problem."""
    content_info = cms.ContentInfo.load(token_der, strict=True)
    if content_info["content_type"].native != "signed_data":
        raise TimestampError(f"not a TimeStampToken: the content type is {content_info['content_type'].dotted}")
    signed_data = content_info["content"]
    encap = signed_data["encap_content_info"]
    if encap["content_type"].native != "tst_info":
        raise TimestampError(f"not a TimeStampToken: the eContentType is {encap['content_type'].dotted}")
    tst_der = bytes(encap["content"].contents)
    tst_info = tsp.TSTInfo.load(tst_der, strict=True)
    tst_info.native  # noqa: B018 - force the lazy parse so a malformed TSTInfo fails here
    signer_infos = signed_data["signer_infos"]
    if len(signer_infos) != 1:
        raise TimestampError(f"a TimeStampToken has exactly one SignerInfo, this one {len(signer_infos)}")
    signer = signer_infos[0]
    signed_attrs = signer["signed_attrs"]
    if isinstance(signed_attrs, core.Void):
        raise TimestampError("the token's SignerInfo has no signed attributes")
    # The signature covers the attributes encoded as a SET OF: the received bytes with the [0] tag swapped. Taken
    # before anything below touches the children, as asn1crypto may re-encode a structure once it is explored.
    raw_attrs = bytes(signed_attrs.dump())
    attributes: dict[str, list[Any]] = {}
    for attribute in signed_attrs:
        name = str(attribute["type"].native)
        if name in attributes:
            raise TimestampError(f"the token's signed attribute {name} appears twice")
        attributes[name] = list(attribute["values"])
    sid = signer["sid"]
    certificates = tuple(
        bytes(choice.chosen.dump()) for choice in (signed_data["certificates"] or []) if choice.name == "certificate"
    )
    imprint = tst_info["message_imprint"]
    return _ParsedToken(
        tst_der=tst_der,
        imprint_algorithm=str(imprint["hash_algorithm"]["algorithm"].native),
        imprint=bytes(imprint["hashed_message"].native),
        gen_time=tst_info["gen_time"].native.astimezone(UTC),
        serial=int(tst_info["serial_number"].native),
        policy=str(tst_info["policy"].dotted),
        nonce=None if tst_info["nonce"].native is None else int(tst_info["nonce"].native),
        certificates=certificates,
        sid_issuer_serial=(
            (bytes(sid.chosen["issuer"].dump()), int(sid.chosen["serial_number"].native))
            if sid.name == "issuer_and_serial_number"
            else None
        ),
        sid_key_id=bytes(sid.chosen.native) if sid.name == "subject_key_identifier" else None,
        digest_algorithm=str(signer["digest_algorithm"]["algorithm"].native),
        signed_attrs_der=b"\x31" + raw_attrs[1:],
        attributes=attributes,
        signature_algorithm=signer["signature_algorithm"],
        signature=bytes(signer["signature"].native),
    )


def verify_token(token_der: bytes, digest: bytes, trusted: Sequence[x509.Certificate]) -> TimestampInfo:
    """Check that ``token_der`` is a TSA's signature over ``digest`` (SHA-256) and return what it attests.

    The signer certificate must be one of ``trusted`` or be issued (signature-checked) by one of them, carry
    the critical timeStamping extended key usage, and be valid at ``genTime``. Each failure raises
    :class:`TimestampError` naming the check.
    """
    try:
        token = _parse_token(token_der)
    except _PARSE_ERRORS:
        raise TimestampError("not a DER TimeStampToken") from None
    try:
        return _verify(token, digest, trusted)
    except _PARSE_ERRORS as exc:
        # asn1crypto parses nested values (attribute values, algorithm parameters) only when they are read.
        raise TimestampError(f"not a DER TimeStampToken: a field inside is malformed ({type(exc).__name__})") from None


def _verify(token: _ParsedToken, digest: bytes, trusted: Sequence[x509.Certificate]) -> TimestampInfo:
    if token.imprint_algorithm != "sha256":
        raise TimestampError(f"the token's message imprint uses {token.imprint_algorithm}, not SHA-256")
    if token.imprint != digest:
        raise TimestampError("the token's message imprint does not match the record")
    _check_content_type(token)
    digest_hash = _hash_algorithm(token.digest_algorithm, "the SignerInfo's digest algorithm")
    if _single_octets(token, "message_digest") != _hash(digest_hash, token.tst_der):
        raise TimestampError("the token's signed message-digest does not match its TSTInfo (the TSTInfo was altered)")
    signer = _signer_certificate(token, trusted)
    _check_signature(token, signer, digest_hash)
    _check_signing_certificate(token, signer)
    _check_trusted(signer, trusted)
    _check_eku(signer)
    if not signer.not_valid_before_utc <= token.gen_time <= signer.not_valid_after_utc:
        raise TimestampError(
            f"the token's genTime {token.gen_time.isoformat()} lies outside the TSA certificate's validity "
            f"({signer.not_valid_before_utc.isoformat()} to {signer.not_valid_after_utc.isoformat()})"
        )
    return TimestampInfo(
        gen_time=token.gen_time,
        serial=token.serial,
        policy=token.policy,
        tsa=signer.subject.rfc4514_string(),
        tsa_certificate_sha256=signer.fingerprint(hashes.SHA256()).hex(),
    )


def _check_content_type(token: _ParsedToken) -> None:
    values = token.attributes.get("content_type")
    if values is None or len(values) != 1:
        raise TimestampError("the token's signed attributes need exactly one content-type")
    if values[0].native != "tst_info":
        raise TimestampError(f"the token's signed content-type is {values[0].dotted}, not id-ct-TSTInfo")


def _single_octets(token: _ParsedToken, attribute: str) -> bytes:
    values = token.attributes.get(attribute)
    if values is None or len(values) != 1:
        raise TimestampError(f"the token's signed attributes need exactly one {attribute.replace('_', '-')}")
    try:
        return bytes(values[0].native)
    except _PARSE_ERRORS:
        raise TimestampError(f"the token's {attribute.replace('_', '-')} attribute is malformed") from None


def _hash_algorithm(name: str, what: str) -> hashes.HashAlgorithm:
    factory = _HASHES.get(name)
    if factory is None:
        raise TimestampError(f"{what} {name} is not supported (SHA-224/256/384/512 are)")
    return factory()


def _hash(algorithm: hashes.HashAlgorithm, data: bytes) -> bytes:
    context = hashes.Hash(algorithm)
    context.update(data)
    return context.finalize()


def _signer_certificate(token: _ParsedToken, trusted: Sequence[x509.Certificate]) -> x509.Certificate:
    """The certificate the SignerInfo names, from the token's certificates or, failing that, ``trusted``."""
    candidates = [_token_certificate(der) for der in token.certificates]
    candidates.extend(trusted)
    for cert in candidates:
        if token.sid_issuer_serial is not None:
            issuer, serial = token.sid_issuer_serial
            if cert.serial_number == serial and cert.issuer.public_bytes() == issuer:
                return cert
        elif token.sid_key_id is not None and _subject_key_id(cert) == token.sid_key_id:
            return cert
    if token.certificates:
        raise TimestampError("no certificate in the token or among the trusted ones matches the token's signer")
    raise TimestampError("the token does not include the TSA certificate and no trusted certificate is its signer")


def _token_certificate(der: bytes) -> x509.Certificate:
    """A certificate the token carries, parsed in full here so that a corrupt one is named as such."""
    try:
        # cryptography only warns about a serial that is not positive (and will refuse it later): refuse it now.
        if asn1_x509.Certificate.load(der)["tbs_certificate"]["serial_number"].native <= 0:
            raise TimestampError("a certificate in the token has a serial number that is not positive (RFC 5280)")
        cert = x509.load_der_x509_certificate(der)
        _ = cert.issuer, cert.subject, cert.extensions  # cryptography parses these lazily
    except (*_PARSE_ERRORS, x509.InvalidVersion, x509.DuplicateExtension):
        raise TimestampError("a certificate in the token is not DER X.509") from None
    return cert


def _subject_key_id(cert: x509.Certificate) -> bytes | None:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    except x509.ExtensionNotFound:
        return None


def _check_signature(token: _ParsedToken, signer: x509.Certificate, digest_hash: hashes.HashAlgorithm) -> None:
    algorithm = token.signature_algorithm
    try:
        key = signer.public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise TimestampError(f"the TSA certificate's public key cannot be used: {exc}") from None
    data = token.signed_attrs_der
    try:
        family = str(algorithm.signature_algo)
    except _PARSE_ERRORS:
        raise TimestampError(
            f"the token's signature algorithm {algorithm['algorithm'].dotted} is not supported"
        ) from None
    try:
        if family == "ecdsa" and isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(token.signature, data, ec.ECDSA(_signature_hash(algorithm, digest_hash)))
        elif family == "rsassa_pkcs1v15" and isinstance(key, RSAPublicKey):
            key.verify(token.signature, data, padding.PKCS1v15(), _signature_hash(algorithm, digest_hash))
        elif family == "rsassa_pss" and isinstance(key, RSAPublicKey):
            pss_padding, pss_hash = _pss(algorithm)
            key.verify(token.signature, data, pss_padding, pss_hash)
        elif family == "ed25519" and isinstance(key, Ed25519PublicKey):
            key.verify(token.signature, data)
        else:
            raise TimestampError(
                f"the token's signature algorithm {algorithm['algorithm'].native} does not fit the TSA "
                f"certificate's {type(key).__name__.removeprefix('_')} or is not supported"
            )
    except InvalidSignature:
        raise TimestampError("the token's signature does not verify") from None


def _signature_hash(algorithm: Any, digest_hash: hashes.HashAlgorithm) -> hashes.HashAlgorithm:
    """The hash a signature algorithm names (sha256_ecdsa ...), or the SignerInfo's for a bare key OID."""
    try:
        name = str(algorithm.hash_algo)
    except _PARSE_ERRORS:
        return digest_hash
    return _hash_algorithm(name, "the token's signature hash")


def _pss(algorithm: Any) -> tuple[padding.PSS, hashes.HashAlgorithm]:
    try:
        params = algorithm["parameters"]
        hash_name = str(params["hash_algorithm"]["algorithm"].native)
        mgf = params["mask_gen_algorithm"]
        mgf_name = str(mgf["algorithm"].native)
        mgf_hash_name = str(mgf["parameters"]["algorithm"].native)
        salt_length = int(params["salt_length"].native)
        trailer = params["trailer_field"].native
    except _PARSE_ERRORS:
        raise TimestampError("the token's RSA-PSS parameters are malformed") from None
    if mgf_name != "mgf1" or trailer != "trailer_field_bc":
        raise TimestampError(f"the token's RSA-PSS uses {mgf_name} / {trailer}; only MGF1 with trailer 0xbc is valid")
    pss_hash = _hash_algorithm(hash_name, "the token's RSA-PSS hash")
    mgf_hash = _hash_algorithm(mgf_hash_name, "the token's RSA-PSS MGF1 hash")
    return padding.PSS(mgf=padding.MGF1(mgf_hash), salt_length=salt_length), pss_hash


def _check_signing_certificate(token: _ParsedToken, signer: x509.Certificate) -> None:
    """RFC 3161 §2.4.2 / RFC 5816: the signed ESS signing-certificate(-v2) attribute names the signer's cert."""
    cert_der = signer.public_bytes(serialization.Encoding.DER)
    if "signing_certificate_v2" in token.attributes:
        values = token.attributes["signing_certificate_v2"]
        try:
            first = values[0]["certs"][0]
            hash_name = str(first["hash_algorithm"]["algorithm"].native)
            cert_hash = bytes(first["cert_hash"].native)
        except _PARSE_ERRORS:
            raise TimestampError("the token's ESS signing-certificate-v2 attribute is malformed") from None
        algorithm = _hash_algorithm(hash_name, "the ESS signing-certificate-v2 hash")
    elif "signing_certificate" in token.attributes:
        try:
            cert_hash = bytes(token.attributes["signing_certificate"][0]["certs"][0]["cert_hash"].native)
        except _PARSE_ERRORS:
            raise TimestampError("the token's ESS signing-certificate attribute is malformed") from None
        algorithm = hashes.SHA1()  # RFC 2634's ESSCertID is SHA-1 by definition  # noqa: S303
    else:
        raise TimestampError(
            "the token lacks the ESS signing-certificate attribute that binds it to the TSA certificate"
        )
    if _hash(algorithm, cert_der) != cert_hash:
        raise TimestampError("the token's ESS signing-certificate attribute names another certificate than its signer")


def _check_trusted(signer: x509.Certificate, trusted: Sequence[x509.Certificate]) -> None:
    if any(signer == anchor for anchor in trusted):
        return
    for anchor in trusted:
        if signer.issuer != anchor.subject:
            continue
        try:
            signer.verify_directly_issued_by(anchor)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return
    raise TimestampError(f"the TSA certificate is not trusted ({signer.subject.rfc4514_string()})")


def _check_eku(cert: x509.Certificate) -> None:
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    except x509.ExtensionNotFound:
        raise TimestampError("the TSA certificate lacks the critical timeStamping extended key usage") from None
    if not eku.critical or ExtendedKeyUsageOID.TIME_STAMPING not in eku.value:
        raise TimestampError("the TSA certificate lacks the critical timeStamping extended key usage")
    if len(eku.value) != 1:  # RFC 3161 §2.3: timeStamping is the only purpose
        raise TimestampError("the TSA certificate's extended key usage has purposes besides timeStamping")


# --- callers' port and its two adapters ------------------------------------------------------------------------


class TimestampPort(Protocol):
    """Whatever stamps a SHA-256 digest and returns the DER TimeStampToken."""

    async def stamp(self, digest: bytes) -> bytes: ...


class LocalTimestamper:
    """The embedded authority behind :class:`TimestampPort` (signing is fast enough to stay on the loop)."""

    def __init__(self, authority: LocalTimestampAuthority) -> None:
        self._authority = authority

    async def stamp(self, digest: bytes) -> bytes:
        request = make_request(digest, nonce=secrets.randbits(NONCE_BITS))
        return token_from_response(self._authority.respond(request), request)


class _BorrowedTransport(httpx.AsyncBaseTransport):
    """A caller's transport that the per-call client must not close."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self._inner = inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        """The caller owns the transport and closes it."""


class HttpTimestampClient:
    """An external TSA over HTTP (RFC 3161 §3.4): POST a TimeStampReq, read a TimeStampResp.

    A client per :meth:`stamp`: stamps are rare (one per signed record) and this keeps no connection pool
    bound to one event loop. Plain ``http://`` is normal for TSAs: the token is signed, and the nonce and
    imprint checks tie the reply to the request.
    """

    def __init__(self, url: str, *, timeout: float = 10.0, transport: httpx.AsyncBaseTransport | None = None) -> None:
        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL as exc:
            raise TimestampError(f"the TSA URL is not valid: {exc}") from None
        if parsed.scheme not in {"http", "https"} or not parsed.host:
            raise TimestampError(
                f"the TSA URL needs http:// or https:// and a host, not {parsed.scheme or '(none)'}://"
            )
        self._url = parsed
        self._host = parsed.host
        self._timeout = timeout
        self._transport = None if transport is None else _BorrowedTransport(transport)

    async def stamp(self, digest: bytes) -> bytes:
        request = make_request(digest, nonce=secrets.randbits(NONCE_BITS))
        body = await self._post(request)
        try:
            return token_from_response(body, request)
        except TimestampError as exc:
            raise TimestampError(f"TSA {self._host}: {exc}") from None

    async def _post(self, request: bytes) -> bytes:
        headers = {"Content-Type": QUERY_TYPE, "Accept": REPLY_TYPE}
        try:
            async with (
                httpx.AsyncClient(transport=self._transport, timeout=self._timeout) as client,
                client.stream("POST", self._url, content=request, headers=headers) as response,
            ):
                if response.status_code != httpx.codes.OK:
                    raise TimestampError(f"TSA {self._host}: HTTP {response.status_code} {response.reason_phrase}")
                content_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
                if content_type != REPLY_TYPE:
                    raise TimestampError(
                        f"TSA {self._host}: the reply's content type is {content_type or '(none)'}, not {REPLY_TYPE}"
                    )
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_REPLY_BYTES:
                        raise TimestampError(f"TSA {self._host}: the reply exceeds {MAX_REPLY_BYTES} bytes")
                return bytes(body)
        except httpx.TimeoutException:
            raise TimestampError(f"TSA {self._host}: no answer within {self._timeout:g} s") from None
        except httpx.HTTPError as exc:
            raise TimestampError(f"TSA {self._host}: the request failed ({type(exc).__name__}: {exc})") from None
