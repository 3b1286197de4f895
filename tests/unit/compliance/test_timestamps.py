"""RFC 3161 timestamps: local authority, request/response/token checks, verification, OpenSSL interop, HTTP client."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest
from asn1crypto import cms, tsp  # type: ignore[import-untyped]
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from compliance.timestamps import (
    POLICY_OID,
    HttpTimestampClient,
    LocalTimestampAuthority,
    LocalTimestamper,
    TimestampError,
    TimestampInfo,
    TimestampPort,
    make_request,
    token_from_response,
    verify_token,
)
from ground.errors import MedhotlineError

DIGEST = hashlib.sha256(b"call record 0001: Ed25519 signature bytes").digest()
OTHER_DIGEST = hashlib.sha256(b"call record 0002: Ed25519 signature bytes").digest()
OPENSSL = "/usr/bin/openssl"
TSA_URL = "http://tsa.example.test/rfc3161"

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


@pytest.fixture
def authority(tmp_path: Path) -> LocalTimestampAuthority:
    return LocalTimestampAuthority.load_or_create(tmp_path / "tsa")


def _stamp(authority: LocalTimestampAuthority, digest: bytes = DIGEST, **request: Any) -> bytes:
    req = make_request(digest, **request)
    return token_from_response(authority.respond(req), req)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _certificate(
    key: PrivateKey,
    subject: str,
    *,
    issuer_key: PrivateKey | None = None,
    issuer: str | None = None,
    eku: Sequence[x509.ObjectIdentifier] | None = (ExtendedKeyUsageOID.TIME_STAMPING,),
    eku_critical: bool = True,
    ca: bool = False,
    serial: int | None = None,
    not_before: datetime | None = None,
    lifetime: timedelta = timedelta(days=365),
) -> x509.Certificate:
    """A test certificate: self-signed unless ``issuer_key`` is given; a TSA certificate by default."""
    start = not_before or datetime.now(UTC) - timedelta(hours=1)
    signer = issuer_key or key
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer or subject)]))
        .public_key(key.public_key())
        .serial_number(serial or x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + lifetime)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=eku_critical)
    algorithm = None if isinstance(signer, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(signer, algorithm)


def _authority_with(cert_key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> LocalTimestampAuthority:
    return LocalTimestampAuthority(cert_key, cert)


def _flip(data: bytes, needle: bytes, offset: int, new: int | None = None) -> bytes:
    """``data`` with one byte of the single occurrence of ``needle`` changed."""
    assert data.count(needle) == 1
    at = data.index(needle) + offset
    value = new if new is not None else data[at] ^ 0x01
    return data[:at] + bytes([value]) + data[at + 1 :]


def _signature_of(token: bytes) -> bytes:
    signer = cms.ContentInfo.load(token)["content"]["signer_infos"][0]
    return bytes(signer["signature"].native)


def _tst_der(token: bytes) -> bytes:
    return bytes(cms.ContentInfo.load(token)["content"]["encap_content_info"]["content"].contents)


# --- round trip -------------------------------------------------------------------------------------------------


def test_round_trip_verifies_and_reports_what_the_token_attests(authority: LocalTimestampAuthority) -> None:
    now = datetime.now(UTC).replace(microsecond=456789)
    request = make_request(DIGEST, nonce=424242)
    token = token_from_response(authority.respond(request, now=now), request)

    info = verify_token(token, DIGEST, [authority.certificate])

    assert info.gen_time == now.replace(microsecond=456000)  # milliseconds survive into genTime
    assert info.policy == POLICY_OID
    assert info.tsa == "CN=medhotline local TSA"
    assert info.tsa_certificate_sha256 == authority.certificate.fingerprint(hashes.SHA256()).hex()
    assert 0 < info.serial < 2**128
    tst = tsp.TSTInfo.load(_tst_der(token))
    assert tst["version"].native == "v1"
    assert tst["nonce"].native == 424242
    assert tst["message_imprint"]["hashed_message"].native == DIGEST
    assert tst["serial_number"].native == info.serial


def test_token_structure_follows_rfc_3161_and_5816(authority: LocalTimestampAuthority) -> None:
    token = _stamp(authority, nonce=7)
    signed_data = cms.ContentInfo.load(token)["content"]
    signer = signed_data["signer_infos"][0]
    attributes = {attr["type"].native: attr["values"] for attr in signer["signed_attrs"]}

    assert signed_data["encap_content_info"]["content_type"].native == "tst_info"
    assert signer["signature_algorithm"]["algorithm"].native == "sha256_ecdsa"
    assert signer["digest_algorithm"]["algorithm"].native == "sha256"
    assert set(attributes) == {"content_type", "message_digest", "signing_time", "signing_certificate_v2"}
    assert attributes["signing_certificate_v2"][0]["certs"][0]["cert_hash"].native == (
        hashlib.sha256(_der(authority.certificate)).digest()
    )
    assert [c.chosen.dump() for c in signed_data["certificates"]] == [_der(authority.certificate)]


def test_without_cert_req_the_certificate_is_left_out_and_found_among_the_trusted(
    authority: LocalTimestampAuthority, tmp_path: Path
) -> None:
    token = _stamp(authority, cert_req=False)
    assert cms.ContentInfo.load(token)["content"]["certificates"].native is None

    assert verify_token(token, DIGEST, [authority.certificate]).policy == POLICY_OID
    other = LocalTimestampAuthority.load_or_create(tmp_path / "other")
    with pytest.raises(TimestampError, match="does not include the TSA certificate and no trusted certificate"):
        verify_token(token, DIGEST, [other.certificate])


async def test_local_timestamper_is_a_timestamp_port(authority: LocalTimestampAuthority) -> None:
    port: TimestampPort = LocalTimestamper(authority)
    token = await port.stamp(DIGEST)
    assert verify_token(token, DIGEST, [authority.certificate]).tsa == "CN=medhotline local TSA"


# --- OpenSSL interoperability -----------------------------------------------------------------------------------


def _openssl(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([OPENSSL, *map(str, args)], capture_output=True, text=True, check=False, timeout=60)


def test_openssl_verifies_the_response_and_the_token(authority: LocalTimestampAuthority, tmp_path: Path) -> None:
    request = make_request(DIGEST, nonce=0xC0FFEE)
    response = authority.respond(request)
    token = token_from_response(response, request)
    (tmp_path / "resp.tsr").write_bytes(response)
    (tmp_path / "token.der").write_bytes(token)
    (tmp_path / "req.tsq").write_bytes(request)
    cert = tmp_path / "tsa.pem"
    cert.write_bytes(authority.certificate_pem)

    for args in (
        ("-in", tmp_path / "resp.tsr"),
        ("-in", tmp_path / "token.der", "-token_in"),
    ):
        done = _openssl("ts", "-verify", "-digest", DIGEST.hex(), *args, "-CAfile", cert, "-untrusted", cert)
        assert done.returncode == 0, done.stderr
        assert "Verification: OK" in done.stdout
    done = _openssl("ts", "-verify", "-queryfile", tmp_path / "req.tsq", "-in", tmp_path / "resp.tsr", "-CAfile", cert)
    assert done.returncode == 0, done.stderr

    # The same check fails for another digest: the OpenSSL run above is a real check.
    wrong = _openssl("ts", "-verify", "-digest", OTHER_DIGEST.hex(), "-in", tmp_path / "resp.tsr", "-CAfile", cert)
    assert wrong.returncode != 0
    assert "Verification: FAILED" in wrong.stdout

    text = _openssl("ts", "-reply", "-in", tmp_path / "resp.tsr", "-text")
    assert text.returncode == 0, text.stderr
    assert "Status: Granted." in text.stdout
    assert f"Policy OID: {POLICY_OID}" in text.stdout
    assert "Nonce: 0xC0FFEE" in text.stdout
    assert "TSA: DirName:/CN=medhotline local TSA" in text.stdout


def test_openssl_rejects_a_token_from_an_untrusted_authority(
    authority: LocalTimestampAuthority, tmp_path: Path
) -> None:
    other = LocalTimestampAuthority.load_or_create(tmp_path / "other")
    (tmp_path / "token.der").write_bytes(_stamp(other))
    cert = tmp_path / "tsa.pem"
    cert.write_bytes(authority.certificate_pem)
    done = _openssl(
        "ts", "-verify", "-digest", DIGEST.hex(), "-in", tmp_path / "token.der", "-token_in", "-CAfile", cert
    )
    assert done.returncode != 0


def test_openssl_prints_a_rejection(authority: LocalTimestampAuthority, tmp_path: Path) -> None:
    (tmp_path / "resp.tsr").write_bytes(authority.respond(b"\x30\x03\x02\x01\x01"))
    text = _openssl("ts", "-reply", "-in", tmp_path / "resp.tsr", "-text")
    assert text.returncode == 0, text.stderr
    assert "Status: Rejected." in text.stdout
    assert "the data submitted has the wrong format" in text.stdout


def _openssl_tsa(tmp_path: Path, key: rsa.RSAPrivateKey, cert: x509.Certificate, ess_alg: str) -> Path:
    """An OpenSSL ``ts -reply`` configuration: OpenSSL acting as an external RSA TSA."""
    key_path = tmp_path / "rsa-tsa.key"
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    cert_path = tmp_path / "rsa-tsa.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    config = tmp_path / "ts.cnf"
    config.write_text(
        "[ tsa ]\ndefault_tsa = tsa_config\n[ tsa_config ]\n"
        f"serial = {tmp_path / 'serial'}\nsigner_cert = {cert_path}\nsigner_key = {key_path}\n"
        "signer_digest = sha256\ndefault_policy = 1.2.3.4.1\ndigests = sha256\naccuracy = secs:1\n"
        f"ordering = no\ntsa_name = yes\ness_cert_id_chain = no\ness_cert_id_alg = {ess_alg}\n"
    )
    (tmp_path / "serial").write_text("2A\n")  # OpenSSL stamps with the next serial, 0x2B
    return config


@pytest.mark.parametrize("ess_alg", ["sha256", "sha1"])
def test_a_token_from_openssl_as_an_rsa_tsa_verifies(tmp_path: Path, ess_alg: str) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = _certificate(key, "External RSA TSA")
    config = _openssl_tsa(tmp_path, key, cert, ess_alg)
    request = make_request(DIGEST, nonce=99)
    (tmp_path / "req.tsq").write_bytes(request)
    done = _openssl(
        "ts", "-reply", "-config", config, "-queryfile", tmp_path / "req.tsq", "-out", tmp_path / "resp.tsr"
    )
    assert done.returncode == 0, done.stderr

    token = token_from_response((tmp_path / "resp.tsr").read_bytes(), request)
    info = verify_token(token, DIGEST, [cert])

    assert info.tsa == "CN=External RSA TSA"
    assert info.policy == "1.2.3.4.1"
    assert info.serial == 0x2B
    with pytest.raises(TimestampError, match="does not match the record"):
        verify_token(token, OTHER_DIGEST, [cert])


# --- other signature algorithms an external TSA may use --------------------------------------------------------


def _token_signed_by(tst_der: bytes, key: PrivateKey, cert: x509.Certificate, scheme: str) -> bytes:
    """A TimeStampToken over ``tst_der`` signed with ``key`` in ``scheme`` (an external TSA's shapes)."""
    asn1_cert = asn1_x509.Certificate.load(_der(cert))
    attrs = cms.CMSAttributes(
        [
            {"type": "content_type", "values": ["tst_info"]},
            {"type": "message_digest", "values": [hashlib.sha256(tst_der).digest()]},
            {
                "type": "signing_certificate_v2",
                "values": [{"certs": [{"cert_hash": hashlib.sha256(_der(cert)).digest()}]}],
            },
        ]
    )
    data = attrs.dump()
    signature_algorithm: dict[str, Any]
    if scheme == "rsa-pss" and isinstance(key, rsa.RSAPrivateKey):
        signature = key.sign(data, padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32), hashes.SHA256())
        signature_algorithm = {
            "algorithm": "rsassa_pss",
            "parameters": {
                "hash_algorithm": {"algorithm": "sha256"},
                "mask_gen_algorithm": {"algorithm": "mgf1", "parameters": {"algorithm": "sha256"}},
                "salt_length": 32,
                "trailer_field": "trailer_field_bc",
            },
        }
    elif scheme == "rsa-pkcs1" and isinstance(key, rsa.RSAPrivateKey):
        signature = key.sign(data, padding.PKCS1v15(), hashes.SHA256())
        signature_algorithm = {"algorithm": "rsassa_pkcs1v15"}  # the bare rsaEncryption OID, as many TSAs send
    elif scheme == "ed25519" and isinstance(key, ed25519.Ed25519PrivateKey):
        signature = key.sign(data)
        signature_algorithm = {"algorithm": "ed25519"}
    else:
        raise AssertionError(scheme)
    signer = cms.SignerInfo(
        {
            "version": "v3",
            "sid": cms.SignerIdentifier({"subject_key_identifier": _ski(cert)}),
            "digest_algorithm": {"algorithm": "sha256"},
            "signed_attrs": attrs,
            "signature_algorithm": signature_algorithm,
            "signature": signature,
        }
    )
    signed_data = cms.SignedData(
        {
            "version": "v3",
            "digest_algorithms": [{"algorithm": "sha256"}],
            "encap_content_info": {"content_type": "tst_info", "content": cms.ParsableOctetString(tst_der)},
            "certificates": [asn1_cert],
            "signer_infos": [signer],
        }
    )
    return bytes(cms.ContentInfo({"content_type": "signed_data", "content": signed_data}).dump())


def _ski(cert: x509.Certificate) -> bytes:
    return x509.SubjectKeyIdentifier.from_public_key(cert.public_key()).digest


def _with_ski(key: PrivateKey, subject: str) -> x509.Certificate:
    """A self-signed TSA certificate that carries a subjectKeyIdentifier (signers named by key id need it)."""
    start = datetime.now(UTC) - timedelta(hours=1)
    public_key = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + timedelta(days=365))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.TIME_STAMPING]), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .sign(key, None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256())
    )


@pytest.mark.parametrize(
    ("scheme", "make_key"),
    [
        pytest.param("rsa-pss", lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048), id="rsa-pss"),
        pytest.param("rsa-pkcs1", lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048), id="pkcs1"),
        pytest.param("ed25519", ed25519.Ed25519PrivateKey.generate, id="ed25519"),
    ],
)
def test_external_signature_schemes_verify_and_a_flipped_signature_fails(
    authority: LocalTimestampAuthority, scheme: str, make_key: Callable[[], PrivateKey]
) -> None:
    key = make_key()
    cert = _with_ski(key, f"External {scheme} TSA")
    token = _token_signed_by(_tst_der(_stamp(authority)), key, cert, scheme)

    assert verify_token(token, DIGEST, [cert]).tsa == f"CN=External {scheme} TSA"
    signature = _signature_of(token)
    tampered = _flip(token, signature, len(signature) - 1)
    with pytest.raises(TimestampError, match="the token's signature does not verify"):
        verify_token(tampered, DIGEST, [cert])


def test_a_signature_scheme_that_does_not_fit_the_key_is_named(authority: LocalTimestampAuthority) -> None:
    ec_cert_key = ec.generate_private_key(ec.SECP256R1())
    ec_cert = _with_ski(ec_cert_key, "Mismatched TSA")
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    # Signed by an RSA key but naming an ECDSA certificate: the algorithm cannot fit the key.
    token = _token_signed_by(_tst_der(_stamp(authority)), rsa_key, ec_cert, "rsa-pss")
    with pytest.raises(TimestampError, match="does not fit the TSA certificate's"):
        verify_token(token, DIGEST, [ec_cert])


# --- verification failures --------------------------------------------------------------------------------------


def test_a_different_digest_is_named(authority: LocalTimestampAuthority) -> None:
    token = _stamp(authority)
    with pytest.raises(TimestampError, match="the token's message imprint does not match the record"):
        verify_token(token, OTHER_DIGEST, [authority.certificate])


def test_a_flipped_byte_in_gen_time_is_named(authority: LocalTimestampAuthority) -> None:
    now = datetime.now(UTC)
    request = make_request(DIGEST)
    token = token_from_response(authority.respond(request, now=now), request)
    seconds = now.strftime("%Y%m%d%H%M%S").encode()
    ones = token[token.index(seconds) + len(seconds) - 1]
    tampered = _flip(token, seconds, len(seconds) - 1, new=ord("0") + (ones - ord("0") + 1) % 10)

    assert tampered != token
    with pytest.raises(TimestampError, match="message-digest does not match its TSTInfo"):
        verify_token(tampered, DIGEST, [authority.certificate])


def test_a_flipped_byte_in_the_signature_is_named(authority: LocalTimestampAuthority) -> None:
    token = _stamp(authority)
    signature = _signature_of(token)
    tampered = _flip(token, signature, len(signature) - 1)
    with pytest.raises(TimestampError, match="the token's signature does not verify"):
        verify_token(tampered, DIGEST, [authority.certificate])


def test_another_authority_is_not_trusted(authority: LocalTimestampAuthority, tmp_path: Path) -> None:
    other = LocalTimestampAuthority.load_or_create(tmp_path / "other")
    token = _stamp(other)
    with pytest.raises(TimestampError, match="the TSA certificate is not trusted"):
        verify_token(token, DIGEST, [authority.certificate])
    with pytest.raises(TimestampError, match="the TSA certificate is not trusted"):
        verify_token(token, DIGEST, [])


@pytest.mark.parametrize(
    ("eku", "critical", "reason"),
    [
        (None, True, "lacks the critical timeStamping extended key usage"),
        ((ExtendedKeyUsageOID.TIME_STAMPING,), False, "lacks the critical timeStamping extended key usage"),
        ((ExtendedKeyUsageOID.CODE_SIGNING,), True, "lacks the critical timeStamping extended key usage"),
        (
            (ExtendedKeyUsageOID.TIME_STAMPING, ExtendedKeyUsageOID.CODE_SIGNING),
            True,
            "has purposes besides timeStamping",
        ),
    ],
)
def test_a_certificate_without_the_critical_timestamping_eku_is_named(
    eku: Sequence[x509.ObjectIdentifier] | None, critical: bool, reason: str
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _certificate(key, "Not a TSA", eku=eku, eku_critical=critical)
    token = _stamp(_authority_with(key, cert))
    with pytest.raises(TimestampError, match=reason):
        verify_token(token, DIGEST, [cert])


def test_a_certificate_issued_by_a_trusted_ca_is_trusted_and_a_forged_one_is_not() -> None:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate(ca_key, "Hospital Root CA", eku=None, ca=True)
    tsa_key = ec.generate_private_key(ec.SECP256R1())
    tsa_cert = _certificate(tsa_key, "Qualified TSA", issuer_key=ca_key, issuer="Hospital Root CA")
    token = _stamp(_authority_with(tsa_key, tsa_cert))

    assert verify_token(token, DIGEST, [ca]).tsa == "CN=Qualified TSA"

    # Same names, issued by a key that is not the CA's: the issuer's signature check fails.
    forger = ec.generate_private_key(ec.SECP256R1())
    forged_cert = _certificate(tsa_key, "Qualified TSA", issuer_key=forger, issuer="Hospital Root CA")
    forged = _stamp(_authority_with(tsa_key, forged_cert))
    with pytest.raises(TimestampError, match="the TSA certificate is not trusted"):
        verify_token(forged, DIGEST, [ca])


def test_gen_time_outside_the_certificate_validity_is_named(authority: LocalTimestampAuthority) -> None:
    before = authority.certificate.not_valid_before_utc - timedelta(days=1)
    request = make_request(DIGEST)
    token = token_from_response(authority.respond(request, now=before), request)
    with pytest.raises(TimestampError, match="lies outside the TSA certificate's validity"):
        verify_token(token, DIGEST, [authority.certificate])


def test_a_substituted_certificate_for_the_same_key_is_caught_by_the_ess_attribute(
    authority: LocalTimestampAuthority, tmp_path: Path
) -> None:
    # A second certificate for the TSA's own key, with the same issuer and serial as the real one (an attacker
    # with the key could try this to change what the token claims about its TSA).
    real = authority.certificate
    key = serialization.load_pem_private_key((tmp_path / "tsa" / "tsa.key.pem").read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    twin = _certificate(key, "medhotline local TSA", serial=real.serial_number, lifetime=timedelta(days=3))
    token_info = cms.ContentInfo.load(_stamp(authority))
    token_info["content"]["certificates"] = [asn1_x509.Certificate.load(_der(twin))]
    swapped = bytes(token_info.dump(force=True))

    with pytest.raises(TimestampError, match="ESS signing-certificate attribute names another certificate"):
        verify_token(swapped, DIGEST, [twin])


@pytest.mark.parametrize("cut", [0, 1, 10, 200])
def test_truncated_or_garbage_tokens_are_not_der(authority: LocalTimestampAuthority, cut: int) -> None:
    token = _stamp(authority)
    with pytest.raises(TimestampError, match="not a DER TimeStampToken"):
        verify_token(token[:cut], DIGEST, [authority.certificate])
    with pytest.raises(TimestampError, match="not a DER TimeStampToken"):
        verify_token(token + b"\x00", DIGEST, [authority.certificate])


def test_a_cms_structure_that_is_not_a_timestamp_token_is_named() -> None:
    data = cms.ContentInfo({"content_type": "data", "content": b"hello"}).dump()
    with pytest.raises(TimestampError, match=r"not a TimeStampToken: the content type is 1\.2\.840\.113549\.1\.7\.1"):
        verify_token(data, DIGEST, [])


# --- requests and responses -------------------------------------------------------------------------------------


def test_make_request_encodes_the_fields() -> None:
    request = tsp.TimeStampReq.load(make_request(DIGEST, nonce=5, cert_req=False))
    assert request["version"].native == "v1"
    assert request["message_imprint"]["hash_algorithm"]["algorithm"].native == "sha256"
    assert request["message_imprint"]["hashed_message"].native == DIGEST
    assert request["nonce"].native == 5
    assert request["cert_req"].native is False
    assert tsp.TimeStampReq.load(make_request(DIGEST))["nonce"].native is None


@pytest.mark.parametrize("digest", [b"", DIGEST[:31], DIGEST + b"\x00"])
def test_make_request_refuses_a_digest_that_is_not_sha256(digest: bytes) -> None:
    with pytest.raises(TimestampError, match="a SHA-256 digest is 32 bytes"):
        make_request(digest)


def test_make_request_refuses_a_negative_nonce() -> None:
    with pytest.raises(TimestampError, match="non-negative"):
        make_request(DIGEST, nonce=-1)


class _Response(tsp.TimeStampResp):  # type: ignore[misc]
    """TimeStampResp with the token optional, as RFC 3161 has it (asn1crypto 1.5 requires it)."""

    _fields: ClassVar = [("status", tsp.PKIStatusInfo), ("time_stamp_token", cms.ContentInfo, {"optional": True})]


def _raw_request(algorithm: str, hashed: bytes, **extra: Any) -> bytes:
    fields = {
        "version": "v1",
        "message_imprint": {"hash_algorithm": {"algorithm": algorithm}, "hashed_message": hashed},
        **extra,
    }
    return bytes(tsp.TimeStampReq(fields).dump())


@pytest.mark.parametrize(
    ("request_der", "fail_info", "text"),
    [
        pytest.param(b"not asn.1 at all", "bad_data_format", "not a DER TimeStampReq", id="garbage"),
        pytest.param(b"", "bad_data_format", "not a DER TimeStampReq", id="empty"),
        pytest.param(make_request(DIGEST)[:-3], "bad_data_format", "not a DER TimeStampReq", id="truncated"),
        pytest.param(make_request(DIGEST) + b"\x00", "bad_data_format", "not a DER TimeStampReq", id="trailing"),
        pytest.param(
            _raw_request("sha1", hashlib.sha1(b"x").digest()),
            "bad_alg",
            "uses sha1; this TSA accepts SHA-256 only",
            id="sha1",
        ),
        pytest.param(_raw_request("sha512", hashlib.sha512(b"x").digest()), "bad_alg", "uses sha512", id="sha512"),
        pytest.param(_raw_request("sha256", b"\x01" * 20), "bad_data_format", "has 20 bytes, not 32", id="short"),
        pytest.param(
            _raw_request("sha256", DIGEST, req_policy="1.2.3.4"), "unaccepted_policy", "not 1.2.3.4", id="policy"
        ),
        pytest.param(_raw_request("sha256", DIGEST, version="v2"), "bad_data_format", "has version v2", id="version"),
    ],
)
def test_bad_requests_get_a_rejection_with_a_fail_info(
    authority: LocalTimestampAuthority, request_der: bytes, fail_info: str, text: str
) -> None:
    response = _Response.load(authority.respond(request_der))
    status = response["status"]
    assert status["status"].native == "rejection"
    assert status["fail_info"].native == {fail_info}
    assert text in status["status_string"].native[0]


def test_token_from_response_names_the_rejection(authority: LocalTimestampAuthority) -> None:
    request = _raw_request("sha1", hashlib.sha1(b"x").digest())
    with pytest.raises(TimestampError, match=r"the TSA answered with status rejection: .*sha1.*failInfo badAlg"):
        token_from_response(authority.respond(request), request)


def test_the_requested_policy_is_granted(authority: LocalTimestampAuthority) -> None:
    request = _raw_request("sha256", DIGEST, req_policy=POLICY_OID, cert_req=True)
    token = token_from_response(authority.respond(request), request)
    assert verify_token(token, DIGEST, [authority.certificate]).policy == POLICY_OID


def test_a_nonce_mismatch_is_named(authority: LocalTimestampAuthority) -> None:
    response = authority.respond(make_request(DIGEST, nonce=1))
    with pytest.raises(TimestampError, match="the response's nonce differs from the request's"):
        token_from_response(response, make_request(DIGEST, nonce=2))
    with pytest.raises(TimestampError, match="the response's nonce differs from the request's"):
        token_from_response(authority.respond(make_request(DIGEST)), make_request(DIGEST, nonce=2))


def test_a_response_for_another_digest_is_named(authority: LocalTimestampAuthority) -> None:
    response = authority.respond(make_request(DIGEST, nonce=1))
    with pytest.raises(TimestampError, match="imprint differs from the request's"):
        token_from_response(response, make_request(OTHER_DIGEST, nonce=1))


def test_a_missing_certificate_that_was_asked_for_is_named(authority: LocalTimestampAuthority) -> None:
    response = authority.respond(make_request(DIGEST, nonce=1, cert_req=False))
    with pytest.raises(TimestampError, match="asked for the TSA certificate"):
        token_from_response(response, make_request(DIGEST, nonce=1, cert_req=True))


@pytest.mark.parametrize("garbage", [b"", b"\x30\x00", b"<html>busy</html>"])
def test_a_response_that_is_not_der_is_named(garbage: bytes) -> None:
    with pytest.raises(TimestampError, match="the response is not a DER TimeStampResp"):
        token_from_response(garbage, make_request(DIGEST))


def test_respond_needs_an_aware_time(authority: LocalTimestampAuthority) -> None:
    with pytest.raises(TimestampError, match="timezone-aware"):
        authority.respond(make_request(DIGEST), now=datetime(2030, 1, 1))


def test_serials_are_unique_across_threads(authority: LocalTimestampAuthority) -> None:
    threads, per_thread = 4, 60
    start = threading.Barrier(threads)

    def stamp_many(index: int) -> list[TimestampInfo]:
        start.wait()
        digests = [hashlib.sha256(f"{index}-{n}".encode()).digest() for n in range(per_thread)]
        return [
            verify_token(_stamp(authority, digest, nonce=n), digest, [authority.certificate])
            for n, digest in enumerate(digests)
        ]

    with ThreadPoolExecutor(max_workers=threads) as pool:
        infos = [info for batch in pool.map(stamp_many, range(threads)) for info in batch]

    assert len(infos) == threads * per_thread
    assert len({info.serial for info in infos}) == threads * per_thread


# --- key and certificate files ----------------------------------------------------------------------------------


def test_load_or_create_makes_private_files_and_reuses_them(tmp_path: Path) -> None:
    directory = tmp_path / "state" / "tsa"
    first = LocalTimestampAuthority.load_or_create(directory)
    token = _stamp(first)

    assert _mode(directory) == 0o700
    assert sorted(p.name for p in directory.iterdir()) == ["tsa.cert.pem", "tsa.key.pem"]
    assert all(_mode(p) == 0o600 for p in directory.iterdir())

    second = LocalTimestampAuthority.load_or_create(directory)
    assert _der(second.certificate) == _der(first.certificate)
    assert second.certificate_pem == first.certificate_pem
    assert verify_token(token, DIGEST, [second.certificate]).tsa == "CN=medhotline local TSA"
    assert verify_token(_stamp(second), DIGEST, [first.certificate]).tsa == "CN=medhotline local TSA"


def test_the_certificate_is_a_30_year_p256_timestamping_certificate(tmp_path: Path) -> None:
    cert = LocalTimestampAuthority.load_or_create(tmp_path / "tsa", name="Ward 3 TSA").certificate
    assert cert.subject.rfc4514_string() == "CN=Ward 3 TSA"
    assert cert.issuer == cert.subject
    assert cert.not_valid_after_utc - cert.not_valid_before_utc >= timedelta(days=365 * 30)
    public_key = cert.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    assert isinstance(public_key.curve, ec.SECP256R1)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    assert eku.critical
    assert list(eku.value) == [ExtendedKeyUsageOID.TIME_STAMPING]
    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.value.ca is False
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature
    assert usage.content_commitment
    assert not usage.key_cert_sign
    cert.verify_directly_issued_by(cert)  # self-signed


def test_a_missing_certificate_is_recreated_for_the_existing_key(tmp_path: Path) -> None:
    directory = tmp_path / "tsa"
    first = LocalTimestampAuthority.load_or_create(directory)
    (directory / "tsa.cert.pem").unlink()
    second = LocalTimestampAuthority.load_or_create(directory)
    assert second.certificate.public_key() == first.certificate.public_key()
    assert _mode(directory / "tsa.cert.pem") == 0o600


def test_a_certificate_without_its_key_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "tsa"
    LocalTimestampAuthority.load_or_create(directory)
    (directory / "tsa.key.pem").unlink()
    with pytest.raises(TimestampError, match=r"tsa\.cert\.pem: a TSA certificate without its private key"):
        LocalTimestampAuthority.load_or_create(directory)


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        (
            "tsa.key.pem",
            b"-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n",
            "cannot read the TSA private key",
        ),
        ("tsa.key.pem", b"", "cannot read the TSA private key"),
        (
            "tsa.cert.pem",
            b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
            "cannot read the TSA certificate",
        ),
        ("tsa.cert.pem", b"not pem", "cannot read the TSA certificate"),
    ],
)
def test_a_corrupt_file_is_named(tmp_path: Path, name: str, content: bytes, reason: str) -> None:
    directory = tmp_path / "tsa"
    LocalTimestampAuthority.load_or_create(directory)
    (directory / name).write_bytes(content)
    with pytest.raises(TimestampError, match=rf"{name}: {reason}"):
        LocalTimestampAuthority.load_or_create(directory)


def test_a_key_of_another_type_is_named(tmp_path: Path) -> None:
    directory = tmp_path / "tsa"
    directory.mkdir(mode=0o700)
    fd = os.open(directory / "tsa.key.pem", os.O_WRONLY | os.O_CREAT, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(
            ed25519.Ed25519PrivateKey.generate().private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    with pytest.raises(TimestampError, match=r"tsa\.key\.pem: not an ECDSA P-256 private key"):
        LocalTimestampAuthority.load_or_create(directory)


def test_a_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "tsa"
    LocalTimestampAuthority.load_or_create(directory)
    (directory / "tsa.key.pem").chmod(0o644)
    with pytest.raises(TimestampError, match=r"tsa\.key\.pem: the TSA private key is readable by others \(mode 0644\)"):
        LocalTimestampAuthority.load_or_create(directory)


def test_a_certificate_of_another_key_is_refused(tmp_path: Path) -> None:
    LocalTimestampAuthority.load_or_create(tmp_path / "a")
    LocalTimestampAuthority.load_or_create(tmp_path / "b")
    (tmp_path / "a" / "tsa.cert.pem").write_bytes((tmp_path / "b" / "tsa.cert.pem").read_bytes())
    with pytest.raises(TimestampError, match=r"tsa\.cert\.pem: the certificate does not belong to the private key"):
        LocalTimestampAuthority.load_or_create(tmp_path / "a")


def test_timestamp_error_is_a_medhotline_error() -> None:
    assert issubclass(TimestampError, MedhotlineError)


# --- HTTP client ------------------------------------------------------------------------------------------------


def _tsa_handler(
    authority: LocalTimestampAuthority, seen: list[httpx.Request]
) -> Callable[[httpx.Request], httpx.Response]:
    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(
            200, headers={"Content-Type": "application/timestamp-reply"}, content=authority.respond(request.content)
        )

    return handle


class _CountingTransport(httpx.MockTransport):
    closed = 0

    async def aclose(self) -> None:
        self.closed += 1


async def test_http_client_stamps_through_a_tsa(authority: LocalTimestampAuthority) -> None:
    seen: list[httpx.Request] = []
    transport = _CountingTransport(_tsa_handler(authority, seen))
    client = HttpTimestampClient(TSA_URL, transport=transport)

    first = await client.stamp(DIGEST)
    second = await client.stamp(OTHER_DIGEST)

    assert verify_token(first, DIGEST, [authority.certificate]).policy == POLICY_OID
    assert verify_token(second, OTHER_DIGEST, [authority.certificate]).policy == POLICY_OID
    assert [r.method for r in seen] == ["POST", "POST"]
    assert str(seen[0].url) == TSA_URL
    assert seen[0].headers["content-type"] == "application/timestamp-query"
    nonces = [tsp.TimeStampReq.load(r.content)["nonce"].native for r in seen]
    assert None not in nonces
    assert nonces[0] != nonces[1]
    assert transport.closed == 0  # the caller's transport stays open for the next stamp


@pytest.mark.parametrize(
    ("response", "reason"),
    [
        (httpx.Response(500, text="boom"), "TSA tsa.example.test: HTTP 500 Internal Server Error"),
        (httpx.Response(404), "TSA tsa.example.test: HTTP 404 Not Found"),
        (
            httpx.Response(200, headers={"Content-Type": "text/html; charset=utf-8"}, text="<html>login</html>"),
            "TSA tsa.example.test: the reply's content type is text/html, not application/timestamp-reply",
        ),
        (httpx.Response(200, content=b"\x30\x00"), r"TSA tsa.example.test: the reply's content type is \(none\)"),
        (
            httpx.Response(200, headers={"Content-Type": "application/timestamp-reply"}, content=b"\x30\x00"),
            "TSA tsa.example.test: the response is not a DER TimeStampResp",
        ),
        (
            httpx.Response(200, headers={"Content-Type": "application/timestamp-reply"}, content=b"\x00" * 300_000),
            "TSA tsa.example.test: the reply exceeds",
        ),
    ],
)
async def test_http_client_names_bad_replies(response: httpx.Response, reason: str) -> None:
    client = HttpTimestampClient(TSA_URL, transport=httpx.MockTransport(lambda _request: response))
    with pytest.raises(TimestampError, match=reason):
        await client.stamp(DIGEST)


async def test_http_client_relays_a_rejection(authority: LocalTimestampAuthority) -> None:
    def reject(request: httpx.Request) -> httpx.Response:
        rejection = authority.respond(b"garbage")
        return httpx.Response(200, headers={"Content-Type": "application/timestamp-reply"}, content=rejection)

    client = HttpTimestampClient(TSA_URL, transport=httpx.MockTransport(reject))
    with pytest.raises(TimestampError, match=r"TSA tsa\.example\.test: the TSA answered with status rejection"):
        await client.stamp(DIGEST)


async def test_http_client_names_a_timeout_and_a_connection_failure() -> None:
    def time_out(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    slow = HttpTimestampClient(TSA_URL, timeout=2.5, transport=httpx.MockTransport(time_out))
    with pytest.raises(TimestampError, match=r"TSA tsa.example.test: no answer within 2.5 s"):
        await slow.stamp(DIGEST)
    down = HttpTimestampClient(TSA_URL, transport=httpx.MockTransport(refuse))
    with pytest.raises(TimestampError, match=r"TSA tsa.example.test: the request failed \(ConnectError"):
        await down.stamp(DIGEST)


async def test_http_client_refuses_a_response_to_another_request(authority: LocalTimestampAuthority) -> None:
    replayed = authority.respond(make_request(DIGEST, nonce=1))  # an old reply, replayed by a middlebox

    def replay(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"Content-Type": "application/timestamp-reply"}, content=replayed)

    client = HttpTimestampClient(TSA_URL, transport=httpx.MockTransport(replay))
    with pytest.raises(TimestampError, match=r"TSA tsa\.example\.test: the response's nonce differs"):
        await client.stamp(DIGEST)


@pytest.mark.parametrize("url", ["ftp://tsa.example.test/", "tsa.example.test", "http://"])
def test_http_client_refuses_a_url_without_http_and_host(url: str) -> None:
    with pytest.raises(TimestampError, match="TSA URL"):
        HttpTimestampClient(url)


def test_every_single_byte_change_is_refused_or_harmless(authority: LocalTimestampAuthority) -> None:
    """Change each byte of a token in turn: verification raises TimestampError (never another exception), and
    always does for a byte of the TSTInfo, the signed attributes or the signature. The few bytes nothing covers
    (SignedData's digestAlgorithms, the embedded copy of a certificate that is also trusted) change nothing."""
    token = _stamp(authority, nonce=3)
    expected = verify_token(token, DIGEST, [authority.certificate])
    signer = cms.ContentInfo.load(token)["content"]["signer_infos"][0]
    covered: set[int] = set()
    for part in (_tst_der(token), bytes(signer["signed_attrs"].dump()), _signature_of(token)):
        start = token.index(part)
        covered.update(range(start, start + len(part)))

    for at in range(len(token)):
        tampered = token[:at] + bytes([token[at] ^ 0x5A]) + token[at + 1 :]
        try:
            info = verify_token(tampered, DIGEST, [authority.certificate])
        except TimestampError:
            continue
        assert at not in covered, f"byte {at} is covered by the signature yet the change went unnoticed"
        assert info == expected, f"byte {at} changed what the token attests"
