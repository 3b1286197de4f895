"""Streaming envelope encryption of recordings: round trips, every kind of tampering, exports, watermarks."""

from __future__ import annotations

import hashlib
import itertools
import os
import stat
import struct
import wave
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

import recordings.envelope as envelope
from ground.errors import MedhotlineError
from recordings.envelope import (
    CHUNK_SIZE,
    EnvelopeError,
    SealedFile,
    export_label,
    generate_identity,
    load_identity,
    load_recipient_public_key,
    open_for_recipient,
    open_sealed,
    read_wav_comment,
    seal_chunks,
    seal_file,
    seal_for_recipient,
    sha256_file,
    unseal_file,
    watermark_wav,
)

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
CONTEXT = b"recording:3f2a:v1"
SMALL = 16  # chunk size for the layout tests
HEADER = 5 + 1 + 4 + 16  # magic, version, chunk size, salt
FULL_CHUNK = 1 + SMALL + 16  # marker, ciphertext, tag


def plaintext(size: int, seed: int = 0) -> bytes:
    """Deterministic, incompressible-looking bytes (so a chunk is never mistaken for another)."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def opened(path: Path, key: bytes | bytearray = KEY, context: bytes = CONTEXT) -> bytes:
    return b"".join(open_sealed(path, key, context=context))


def sealed_bytes(tmp_path: Path, data: bytes, chunk_size: int = SMALL, name: str = "sealed") -> bytes:
    dst = tmp_path / name
    seal_chunks([data], dst, KEY, context=CONTEXT, chunk_size=chunk_size)
    return dst.read_bytes()


# --- round trips --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "chunk_size"),
    [
        (0, SMALL),
        (1, SMALL),
        (SMALL, SMALL),
        (SMALL + 1, SMALL),
        (3 * SMALL, SMALL),
        (0, CHUNK_SIZE),
        (CHUNK_SIZE, CHUNK_SIZE),
        (CHUNK_SIZE + 1, CHUNK_SIZE),
        (3 * 1024 * 1024 + 5, 4096),
    ],
)
def test_seal_file_round_trip_and_digests(tmp_path: Path, size: int, chunk_size: int) -> None:
    data = plaintext(size)
    src = write(tmp_path / "plain.wav", data)
    dst = tmp_path / "sealed.tmp"
    result = seal_file(src, dst, KEY, context=CONTEXT, chunk_size=chunk_size)
    ciphertext = dst.read_bytes()
    assert result == SealedFile(
        plain_sha256=hashlib.sha256(data).hexdigest(),
        cipher_sha256=hashlib.sha256(ciphertext).hexdigest(),
        plain_size=size,
        cipher_size=len(ciphertext),
    )
    assert stat.S_IMODE(dst.stat().st_mode) == 0o600
    full_chunks = max(0, (size - 1) // chunk_size)
    assert (
        len(ciphertext) == HEADER + full_chunks * (1 + chunk_size + 16) + 1 + 4 + (size - full_chunks * chunk_size) + 16
    )
    if size >= SMALL:
        assert data[:SMALL] not in ciphertext
    assert opened(dst) == data

    out = tmp_path / "plain.out"
    unsealed = unseal_file(dst, out, KEY, context=CONTEXT)
    assert out.read_bytes() == data
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert unsealed == result


def test_open_yields_chunks_of_the_chunk_size(tmp_path: Path) -> None:
    src = write(tmp_path / "plain", plaintext(50))
    seal_file(src, tmp_path / "sealed", KEY, context=CONTEXT, chunk_size=SMALL)
    assert [len(piece) for piece in open_sealed(tmp_path / "sealed", KEY, context=CONTEXT)] == [16, 16, 16, 2]


def test_empty_plaintext_is_one_final_empty_chunk(tmp_path: Path) -> None:
    ciphertext = sealed_bytes(tmp_path, b"")
    assert ciphertext[:10] == b"MHREC\x01" + struct.pack(">I", SMALL)
    assert ciphertext[HEADER : HEADER + 5] == b"\x01\x00\x00\x00\x00"
    assert len(ciphertext) == HEADER + 5 + 16
    assert list(open_sealed(tmp_path / "sealed", KEY, context=CONTEXT)) == [b""]


def test_bytearray_key_and_memoryview_pieces(tmp_path: Path) -> None:
    data = plaintext(100)
    pieces: list[bytes] = [memoryview(data)[:33], bytearray(data[33:90]), data[90:]]  # type: ignore[list-item]
    seal_chunks(pieces, tmp_path / "sealed", bytearray(KEY), context=CONTEXT, chunk_size=SMALL)
    assert opened(tmp_path / "sealed", bytearray(KEY)) == data


def test_each_file_gets_its_own_salt(tmp_path: Path) -> None:
    first = sealed_bytes(tmp_path, b"same", name="a")
    second = sealed_bytes(tmp_path, b"same", name="b")
    assert first[10:HEADER] != second[10:HEADER]
    assert first[HEADER:] != second[HEADER:]


@given(
    pieces=st.lists(st.binary(max_size=70), max_size=12),
    chunk_size=st.integers(min_value=1, max_value=40),
)
@settings(max_examples=60, deadline=None)
def test_any_pieces_any_chunk_size_round_trip(
    tmp_path_factory: pytest.TempPathFactory, pieces: list[bytes], chunk_size: int
) -> None:
    directory = tmp_path_factory.mktemp("pieces")
    data = b"".join(pieces)
    result = seal_chunks(pieces, directory / "sealed", KEY, context=CONTEXT, chunk_size=chunk_size)
    assert result.plain_sha256 == hashlib.sha256(data).hexdigest()
    assert result.cipher_sha256 == sha256_file(directory / "sealed")
    assert opened(directory / "sealed") == data


def test_sha256_file_matches_hashlib(tmp_path: Path) -> None:
    data = plaintext(3 * 1024 * 1024 + 3)
    assert sha256_file(write(tmp_path / "f", data)) == hashlib.sha256(data).hexdigest()
    with pytest.raises(EnvelopeError, match="missing: cannot read"):
        sha256_file(tmp_path / "missing")


# --- tampering --------------------------------------------------------------------------------------------------


@pytest.fixture
def five_chunks(tmp_path: Path) -> bytes:
    """70 bytes in chunks of 16: four full chunks (0-3) and a final one (4) of 6 bytes."""
    return sealed_bytes(tmp_path, plaintext(70))


def chunk_span(index: int) -> slice:
    return slice(HEADER + index * FULL_CHUNK, HEADER + (index + 1) * FULL_CHUNK)


def flip(data: bytes, position: int, bit: int = 0) -> bytes:
    changed = bytearray(data)
    changed[position] ^= 1 << bit
    return bytes(changed)


def expect_failure(path: Path, data: bytes, pattern: str, key: bytes = KEY, context: bytes = CONTEXT) -> EnvelopeError:
    write(path, data)
    with pytest.raises(EnvelopeError, match=pattern) as caught:
        opened(path, key, context)
    assert str(path) in str(caught.value)
    assert isinstance(caught.value, MedhotlineError)
    return caught.value


def test_the_untampered_fixture_opens(tmp_path: Path, five_chunks: bytes) -> None:
    assert opened(write(tmp_path / "f", five_chunks)) == plaintext(70)
    assert len(five_chunks) == HEADER + 4 * FULL_CHUNK + 1 + 4 + 6 + 16


def test_dropping_the_final_chunk_is_truncation(tmp_path: Path, five_chunks: bytes) -> None:
    error = expect_failure(tmp_path / "f", five_chunks[: chunk_span(3).stop], r": chunk 4: truncated: no final chunk$")
    assert (error.chunk, error.reason) == (4, "truncated: no final chunk")


def test_dropping_several_final_chunks_is_truncation(tmp_path: Path, five_chunks: bytes) -> None:
    expect_failure(tmp_path / "f", five_chunks[: chunk_span(1).stop], r": chunk 2: truncated: no final chunk$")


def test_header_only_is_truncation(tmp_path: Path, five_chunks: bytes) -> None:
    expect_failure(tmp_path / "f", five_chunks[:HEADER], r": chunk 0: truncated: no final chunk$")


def test_cut_inside_a_chunk(tmp_path: Path, five_chunks: bytes) -> None:
    expect_failure(tmp_path / "f", five_chunks[: chunk_span(2).start + 10], r": chunk 2: truncated: chunk cut short")
    expect_failure(tmp_path / "g", five_chunks[:-1], r": chunk 4: truncated: chunk cut short")


def test_reordered_chunks(tmp_path: Path, five_chunks: bytes) -> None:
    one, two = five_chunks[chunk_span(1)], five_chunks[chunk_span(2)]
    swapped = five_chunks[: chunk_span(1).start] + two + one + five_chunks[chunk_span(2).stop :]
    error = expect_failure(tmp_path / "f", swapped, r": chunk 1: authentication failed$")
    assert (error.chunk, error.reason) == (1, "authentication failed")


def test_duplicated_chunk(tmp_path: Path, five_chunks: bytes) -> None:
    one = five_chunks[chunk_span(1)]
    duplicated = five_chunks[: chunk_span(1).stop] + one + five_chunks[chunk_span(1).stop :]
    expect_failure(tmp_path / "f", duplicated, r": chunk 2: authentication failed$")


def test_a_non_final_chunk_cannot_pose_as_the_final_one(tmp_path: Path, five_chunks: bytes) -> None:
    # Drop the final chunk and relabel chunk 3 as final (marker and length), as an attacker cutting the tail would.
    three = five_chunks[chunk_span(3)]
    forged = five_chunks[: chunk_span(3).start] + b"\x01" + struct.pack(">I", SMALL) + three[1:]
    expect_failure(tmp_path / "f", forged, r": chunk 3: authentication failed$")


@pytest.mark.parametrize("extra", [b"\x00", b"appended", b"\x01\x00\x00\x00\x00" + bytes(16)])
def test_appended_bytes(tmp_path: Path, five_chunks: bytes, extra: bytes) -> None:
    error = expect_failure(tmp_path / "f", five_chunks + extra, r": chunk 5: trailing data after the final chunk$")
    assert error.reason == "trailing data after the final chunk"


def test_appended_copy_of_the_final_chunk(tmp_path: Path, five_chunks: bytes) -> None:
    final = five_chunks[chunk_span(4).start :]
    expect_failure(tmp_path / "f", five_chunks + final, r": chunk 5: trailing data after the final chunk$")


def test_nothing_from_the_final_chunk_is_yielded_before_the_end_is_checked(tmp_path: Path, five_chunks: bytes) -> None:
    path = write(tmp_path / "f", five_chunks + b"x")
    received: list[bytes] = []
    with pytest.raises(EnvelopeError, match="trailing data"):
        received.extend(open_sealed(path, KEY, context=CONTEXT))
    assert b"".join(received) == plaintext(64)


@pytest.mark.parametrize("chunk", [0, 2, 4])
def test_flipped_ciphertext_bit(tmp_path: Path, five_chunks: bytes, chunk: int) -> None:
    position = chunk_span(chunk).start + 5 + (4 if chunk == 4 else 0)
    expect_failure(tmp_path / "f", flip(five_chunks, position, 3), rf": chunk {chunk}: authentication failed")


def test_flipped_tag_bit(tmp_path: Path, five_chunks: bytes) -> None:
    expect_failure(tmp_path / "f", flip(five_chunks, len(five_chunks) - 1, 7), r": chunk 4: authentication failed")


def test_flipped_marker_bits(tmp_path: Path, five_chunks: bytes) -> None:
    expect_failure(tmp_path / "f", flip(five_chunks, chunk_span(1).start), r": chunk 1: authentication failed")
    expect_failure(tmp_path / "g", flip(five_chunks, chunk_span(1).start, 4), r": chunk 1: authentication failed")
    # The final chunk's marker turned into "not last": a full chunk is expected and the file ends too soon.
    expect_failure(
        tmp_path / "h",
        flip(five_chunks, chunk_span(4).start),
        r": chunk 4: truncated: chunk cut short \(or its framing",
    )


def test_flipped_final_length(tmp_path: Path, five_chunks: bytes) -> None:
    length_at = chunk_span(4).start + 4
    expect_failure(tmp_path / "f", flip(five_chunks, length_at, 0), r": chunk 4: ")
    expect_failure(tmp_path / "g", flip(five_chunks, length_at, 1), r": chunk 4: authentication failed")


@pytest.mark.parametrize("position", range(10, HEADER))
def test_flipped_salt_bit(tmp_path: Path, five_chunks: bytes, position: int) -> None:
    expect_failure(tmp_path / "f", flip(five_chunks, position), r": chunk 0: authentication failed")


@pytest.mark.parametrize("position", range(5))
def test_flipped_magic(tmp_path: Path, five_chunks: bytes, position: int) -> None:
    error = expect_failure(tmp_path / "f", flip(five_chunks, position), r": header: not a medhotline envelope$")
    assert error.chunk is None


def test_other_version(tmp_path: Path, five_chunks: bytes) -> None:
    changed = five_chunks[:5] + b"\x02" + five_chunks[6:]
    expect_failure(tmp_path / "f", changed, r": header: unsupported format version 2$")


def test_changed_chunk_size_is_caught(tmp_path: Path, five_chunks: bytes) -> None:
    def with_size(size: int) -> bytes:
        return five_chunks[:6] + struct.pack(">I", size) + five_chunks[10:]

    expect_failure(tmp_path / "a", with_size(SMALL + 1), r": chunk 0: authentication failed")
    expect_failure(tmp_path / "b", with_size(SMALL - 1), r": chunk 0: authentication failed")
    expect_failure(tmp_path / "c", with_size(0), r": header: chunk size 0 out of range")
    expect_failure(tmp_path / "d", with_size(2**31), r": header: chunk size 2147483648 out of range")


def test_truncated_header(tmp_path: Path, five_chunks: bytes) -> None:
    expect_failure(tmp_path / "a", five_chunks[:8], r": header: truncated header$")
    expect_failure(tmp_path / "b", five_chunks[:20], r": header: truncated header$")
    expect_failure(tmp_path / "c", b"", r": header: not a medhotline envelope$")
    expect_failure(tmp_path / "d", b"RIFF....WAVEfmt ", r": header: not a medhotline envelope$")


def test_wrong_context(tmp_path: Path, five_chunks: bytes) -> None:
    error = expect_failure(
        tmp_path / "f",
        five_chunks,
        r": chunk 0: authentication failed \(wrong key or context",
        context=b"recording:3f2b:v1",
    )
    assert error.chunk == 0


def test_wrong_key(tmp_path: Path, five_chunks: bytes) -> None:
    error = expect_failure(tmp_path / "f", five_chunks, r": chunk 0: authentication failed", key=OTHER_KEY)
    assert KEY.hex() not in str(error)
    assert OTHER_KEY.hex() not in str(error)


def test_a_file_swapped_for_another_recordings_file_fails(tmp_path: Path) -> None:
    seal_chunks([b"recording one"], tmp_path / "one", KEY, context=b"recording:1:v1")
    seal_chunks([b"recording two"], tmp_path / "two", KEY, context=b"recording:2:v1")
    with pytest.raises(EnvelopeError, match="chunk 0: authentication failed"):
        opened(tmp_path / "two", KEY, b"recording:1:v1")


@pytest.mark.parametrize("bad_key", [b"", bytes(31), bytes(33), bytearray(64)])
def test_key_of_wrong_length_is_refused(tmp_path: Path, bad_key: bytes) -> None:
    src = write(tmp_path / "plain", b"data")
    message = f"a data key must be 32 bytes, not {len(bad_key)}$"
    with pytest.raises(EnvelopeError, match=message):
        seal_file(src, tmp_path / "sealed", bad_key, context=CONTEXT)
    with pytest.raises(EnvelopeError, match=message):
        seal_chunks([b"x"], tmp_path / "sealed", bad_key, context=CONTEXT)
    with pytest.raises(EnvelopeError, match=message):
        open_sealed(src, bad_key, context=CONTEXT)
    with pytest.raises(EnvelopeError, match=message):
        unseal_file(src, tmp_path / "out", bad_key, context=CONTEXT)
    assert not (tmp_path / "sealed").exists()
    assert not (tmp_path / "out").exists()


def test_key_of_wrong_type_is_refused(tmp_path: Path) -> None:
    with pytest.raises(EnvelopeError, match="must be bytes or bytearray, not str"):
        seal_chunks([b"x"], tmp_path / "sealed", "k" * 32, context=CONTEXT)  # type: ignore[arg-type]


def test_empty_context_is_refused(tmp_path: Path) -> None:
    seal_chunks([b"x"], tmp_path / "sealed", KEY, context=CONTEXT)
    with pytest.raises(EnvelopeError, match=r"a context .* is required"):
        seal_chunks([b"x"], tmp_path / "other", KEY, context=b"")
    with pytest.raises(EnvelopeError, match=r"a context .* is required"):
        open_sealed(tmp_path / "sealed", KEY, context=b"")
    with pytest.raises(EnvelopeError, match=r"a context .* is required"):
        unseal_file(tmp_path / "sealed", tmp_path / "out", KEY, context=b"")
    assert not (tmp_path / "other").exists()
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("chunk_size", [0, -1, envelope.MAX_CHUNK_SIZE + 1])
def test_chunk_size_out_of_range_is_refused(tmp_path: Path, chunk_size: int) -> None:
    with pytest.raises(EnvelopeError, match="chunk size must be an integer from 1"):
        seal_chunks([b"x"], tmp_path / "sealed", KEY, context=CONTEXT, chunk_size=chunk_size)
    assert not (tmp_path / "sealed").exists()


def test_missing_sealed_file(tmp_path: Path) -> None:
    with pytest.raises(EnvelopeError, match="missing: cannot read"):
        opened(tmp_path / "missing")


@given(data=st.data())
@settings(max_examples=150, deadline=None)
def test_any_single_bit_flip_or_truncation_fails(tmp_path_factory: pytest.TempPathFactory, data: st.DataObject) -> None:
    directory = tmp_path_factory.mktemp("tamper")
    message = data.draw(st.binary(max_size=120), label="plaintext")
    chunk_size = data.draw(st.integers(min_value=1, max_value=48), label="chunk_size")
    seal_chunks([message], directory / "sealed", KEY, context=CONTEXT, chunk_size=chunk_size)
    original = (directory / "sealed").read_bytes()
    if data.draw(st.booleans(), label="truncate"):
        tampered = original[: data.draw(st.integers(min_value=0, max_value=len(original) - 1), label="length")]
    else:
        position = data.draw(st.integers(min_value=0, max_value=len(original) - 1), label="position")
        tampered = flip(original, position, data.draw(st.integers(min_value=0, max_value=7), label="bit"))
    write(directory / "tampered", tampered)
    with pytest.raises(EnvelopeError, match=r"tampered: (chunk \d+|header): "):
        opened(directory / "tampered")


# --- output files: never overwrite, never leave half a file --------------------------------------------------------


def test_existing_dst_is_refused_and_untouched(tmp_path: Path) -> None:
    src = write(tmp_path / "plain", b"recording")
    sealed = tmp_path / "sealed"
    seal_file(src, sealed, KEY, context=CONTEXT)
    dst = write(tmp_path / "existing", b"precious")
    os.chmod(dst, 0o644)
    calls: list[Callable[[], object]] = [
        lambda: seal_file(src, dst, KEY, context=CONTEXT),
        lambda: seal_chunks([b"x"], dst, KEY, context=CONTEXT),
        lambda: unseal_file(sealed, dst, KEY, context=CONTEXT),
        lambda: seal_for_recipient([b"x"], dst, X25519PrivateKey.generate().public_key(), label="by nurse.liu"),
        lambda: watermark_wav([wav_bytes(b"\x00\x00")], dst, "exported by nurse.liu"),
    ]
    for call in calls:
        with pytest.raises(EnvelopeError, match=f"{dst}: already exists; refusing to overwrite it"):
            call()
        assert dst.read_bytes() == b"precious"
        assert stat.S_IMODE(dst.stat().st_mode) == 0o644


def test_dst_symlink_is_refused_and_its_target_untouched(tmp_path: Path) -> None:
    target = write(tmp_path / "target", b"precious")
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(EnvelopeError, match="already exists"):
        seal_chunks([b"x"], link, KEY, context=CONTEXT)
    assert target.read_bytes() == b"precious"
    assert link.is_symlink()


def test_failing_source_iterator_removes_partial_dst(tmp_path: Path) -> None:
    class RecorderGone(Exception):
        pass

    def pieces() -> Iterator[bytes]:
        yield plaintext(1000)
        raise RecorderGone("the recorder went away")

    with pytest.raises(RecorderGone):
        seal_chunks(pieces(), tmp_path / "sealed", KEY, context=CONTEXT, chunk_size=SMALL)
    assert not (tmp_path / "sealed").exists()


def test_partial_dst_exists_while_writing_and_is_removed_on_failure(tmp_path: Path) -> None:
    seen_sizes: list[int] = []

    def pieces() -> Iterator[bytes]:
        for _ in range(4):
            yield plaintext(20_000)
            seen_sizes.append((tmp_path / "sealed").stat().st_size)
        raise OSError(5, "Input/output error")

    with pytest.raises(OSError, match="Input/output error"):
        seal_chunks(pieces(), tmp_path / "sealed", KEY, context=CONTEXT, chunk_size=4096)
    assert seen_sizes[-1] > 40_000  # the file was really there, partly written
    assert not (tmp_path / "sealed").exists()


def test_source_unreadable_mid_way_removes_partial_dst(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = write(tmp_path / "plain", plaintext(10 * SMALL))
    real_read = envelope._read
    reads = itertools.count()

    def failing_read(handle: object, size: int, path: Path) -> bytes:
        if next(reads) == 3:
            raise EnvelopeError(f"{path}: cannot read: Input/output error")
        return real_read(handle, size, path)  # type: ignore[arg-type]

    monkeypatch.setattr(envelope, "_read", failing_read)
    with pytest.raises(EnvelopeError, match=f"{src}: cannot read: Input/output error"):
        seal_file(src, tmp_path / "sealed", KEY, context=CONTEXT, chunk_size=SMALL)
    assert not (tmp_path / "sealed").exists()


def test_unreadable_source_creates_no_dst(tmp_path: Path) -> None:
    with pytest.raises(EnvelopeError, match="missing: cannot read"):
        seal_file(tmp_path / "missing", tmp_path / "sealed", KEY, context=CONTEXT)
    with pytest.raises(EnvelopeError, match="cannot read"):
        seal_file(tmp_path, tmp_path / "sealed", KEY, context=CONTEXT)
    assert not (tmp_path / "sealed").exists()


def test_unseal_of_a_tampered_file_removes_partial_dst(tmp_path: Path, five_chunks: bytes) -> None:
    write(tmp_path / "f", flip(five_chunks, chunk_span(4).start + 8))
    with pytest.raises(EnvelopeError, match="chunk 4: authentication failed"):
        unseal_file(tmp_path / "f", tmp_path / "out", KEY, context=CONTEXT)
    assert not (tmp_path / "out").exists()
    write(tmp_path / "g", five_chunks[: chunk_span(3).stop])
    with pytest.raises(EnvelopeError, match="chunk 4: truncated: no final chunk"):
        unseal_file(tmp_path / "g", tmp_path / "out", KEY, context=CONTEXT)
    assert not (tmp_path / "out").exists()


# --- exports to a requester ----------------------------------------------------------------------------------


@pytest.fixture
def identity_files(tmp_path: Path) -> tuple[Path, Path]:
    private, public = tmp_path / "id.pem", tmp_path / "id.pub.pem"
    generate_identity(private, public)
    return private, public


def test_generate_identity_writes_x25519_pem(identity_files: tuple[Path, Path]) -> None:
    private, public = identity_files
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert private.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert public.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    identity = load_identity(private)
    assert load_recipient_public_key(public).public_bytes_raw() == identity.public_key().public_bytes_raw()


def test_generate_identity_refuses_existing_files(tmp_path: Path, identity_files: tuple[Path, Path]) -> None:
    private, public = identity_files
    before = private.read_bytes(), public.read_bytes()
    with pytest.raises(EnvelopeError, match="already exists"):
        generate_identity(private, tmp_path / "new.pub")
    with pytest.raises(EnvelopeError, match="already exists"):
        generate_identity(tmp_path / "new", public)
    assert (private.read_bytes(), public.read_bytes()) == before
    assert not (tmp_path / "new").exists()
    assert not (tmp_path / "new.pub").exists()


@pytest.mark.parametrize("size", [0, 1, 5000])
def test_recipient_round_trip(tmp_path: Path, identity_files: tuple[Path, Path], size: int) -> None:
    private, public = identity_files
    data = plaintext(size)
    label = "exported by nurse.liu 2024-05-01T10:00Z 导出"
    result = seal_for_recipient(
        [data[:100], data[100:]], tmp_path / "export", load_recipient_public_key(public), label=label, chunk_size=1024
    )
    ciphertext = (tmp_path / "export").read_bytes()
    assert ciphertext.startswith(b"MHEXP\x01")
    assert result.plain_sha256 == hashlib.sha256(data).hexdigest()
    assert result.cipher_sha256 == hashlib.sha256(ciphertext).hexdigest()
    assert stat.S_IMODE((tmp_path / "export").stat().st_mode) == 0o600
    assert b"".join(open_for_recipient(tmp_path / "export", load_identity(private))) == data
    assert export_label(tmp_path / "export") == label


def test_export_is_streamed_from_a_sealed_recording(tmp_path: Path, identity_files: tuple[Path, Path]) -> None:
    private, public = identity_files
    data = plaintext(10_000)
    seal_file(write(tmp_path / "plain", data), tmp_path / "sealed", KEY, context=CONTEXT, chunk_size=512)
    seal_for_recipient(
        open_sealed(tmp_path / "sealed", KEY, context=CONTEXT),
        tmp_path / "export",
        load_recipient_public_key(public),
        label="by nurse.liu",
    )
    assert b"".join(open_for_recipient(tmp_path / "export", load_identity(private))) == data


def test_export_of_a_tampered_recording_leaves_no_export(tmp_path: Path, identity_files: tuple[Path, Path]) -> None:
    _, public = identity_files
    seal_file(write(tmp_path / "plain", plaintext(100)), tmp_path / "sealed", KEY, context=CONTEXT, chunk_size=SMALL)
    write(tmp_path / "cut", (tmp_path / "sealed").read_bytes()[: HEADER + 2 * FULL_CHUNK])
    with pytest.raises(EnvelopeError, match="chunk 2: truncated: no final chunk"):
        seal_for_recipient(
            open_sealed(tmp_path / "cut", KEY, context=CONTEXT),
            tmp_path / "export",
            load_recipient_public_key(public),
            label="by nurse.liu",
        )
    assert not (tmp_path / "export").exists()


def test_wrong_identity_fails(tmp_path: Path, identity_files: tuple[Path, Path]) -> None:
    _, public = identity_files
    seal_for_recipient([b"audio"], tmp_path / "export", load_recipient_public_key(public), label="by nurse.liu")
    with pytest.raises(EnvelopeError, match=r"export: chunk 0: authentication failed \(wrong identity"):
        list(open_for_recipient(tmp_path / "export", X25519PrivateKey.generate()))


def test_export_tampering_fails(tmp_path: Path, identity_files: tuple[Path, Path]) -> None:
    private, public = identity_files
    label = "by nurse.liu"
    seal_for_recipient([plaintext(100)], tmp_path / "export", load_recipient_public_key(public), label=label)
    original = (tmp_path / "export").read_bytes()
    identity = load_identity(private)
    label_at = 10 + 32 + 2
    cases = {
        "label": (flip(original, label_at), "chunk 0: authentication failed"),
        "ephemeral key": (flip(original, 20), "chunk 0: authentication failed"),
        "body": (flip(original, len(original) - 20), "chunk 0: authentication failed"),
        "tail": (original + b"\x00", "chunk 1: trailing data after the final chunk"),
        "cut": (original[:-1], "chunk 0: truncated: chunk cut short"),
        "label length": (original[:42] + b"\x10\x00" + original[44:], "label length 4096 out of range"),
    }
    for name, (tampered, reason) in cases.items():
        path = write(tmp_path / name.replace(" ", "-"), tampered)
        with pytest.raises(EnvelopeError, match=reason):
            list(open_for_recipient(path, identity))


def test_export_and_recording_are_not_interchangeable(tmp_path: Path, identity_files: tuple[Path, Path]) -> None:
    private, public = identity_files
    seal_for_recipient([b"a"], tmp_path / "export", load_recipient_public_key(public), label="by nurse.liu")
    seal_chunks([b"a"], tmp_path / "sealed", KEY, context=CONTEXT)
    with pytest.raises(EnvelopeError, match="export: header: not a medhotline envelope: this is an export"):
        opened(tmp_path / "export")
    with pytest.raises(EnvelopeError, match="sealed: header: not a medhotline envelope: this is a stored recording"):
        list(open_for_recipient(tmp_path / "sealed", load_identity(private)))


@pytest.mark.parametrize("label", ["", "line\nbreak", "x" * 1025])
def test_bad_labels_are_refused(tmp_path: Path, label: str) -> None:
    with pytest.raises(EnvelopeError, match="an export label must be"):
        seal_for_recipient([b"a"], tmp_path / "export", X25519PrivateKey.generate().public_key(), label=label)
    assert not (tmp_path / "export").exists()


def test_pem_loading_errors_name_the_file(tmp_path: Path, identity_files: tuple[Path, Path]) -> None:
    private, public = identity_files
    ed = Ed25519PrivateKey.generate()
    ed_public = write(
        tmp_path / "ed.pub.pem",
        ed.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
    )
    ed_private = write(
        tmp_path / "ed.pem",
        ed.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )
    os.chmod(ed_private, 0o600)
    locked = write(
        tmp_path / "locked.pem",
        X25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        ),
    )
    os.chmod(locked, 0o600)
    garbage = write(tmp_path / "garbage.pem", b"-----BEGIN PUBLIC KEY-----\nnot base64\n-----END PUBLIC KEY-----\n")
    os.chmod(garbage, 0o600)
    missing = tmp_path / "missing.pem"

    public_cases = [
        (missing, "cannot read the recipient's public key"),
        (garbage, "not a PEM public key"),
        (ed_public, "not an X25519 public key"),
        (private, "holds a private key"),
    ]
    for path, reason in public_cases:
        with pytest.raises(EnvelopeError, match=reason) as caught:
            load_recipient_public_key(path)
        assert str(caught.value).startswith(f"{path}: ")

    os.chmod(public, 0o600)
    identity_cases = [
        (missing, "cannot read the identity"),
        (garbage, "not a PEM private key"),
        (public, "not a PEM private key"),
        (ed_private, "not an X25519 private key"),
        (locked, "password-protected"),
    ]
    for path, reason in identity_cases:
        with pytest.raises(EnvelopeError, match=reason) as caught:
            load_identity(path)
        assert str(caught.value).startswith(f"{path}: ")


def test_identity_readable_by_others_is_refused(identity_files: tuple[Path, Path]) -> None:
    private, _ = identity_files
    os.chmod(private, 0o640)
    with pytest.raises(EnvelopeError, match=r"id.pem: identity is accessible to others \(mode 0640\)"):
        load_identity(private)


# --- watermarks ------------------------------------------------------------------------------------------------


def wav_bytes(frames: bytes, rate: int = 8000) -> bytes:
    """A WAV as Asterisk writes it: 16-bit mono PCM."""
    import io

    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(frames)
    return buffer.getvalue()


def riff_chunk(chunk_id: bytes, body: bytes) -> bytes:
    return chunk_id + struct.pack("<I", len(body)) + body + b"\x00" * (len(body) % 2)


def riff(*chunks: bytes) -> bytes:
    body = b"WAVE" + b"".join(chunks)
    return b"RIFF" + struct.pack("<I", len(body)) + body


FMT = struct.pack("<HHIIHH", 1, 1, 8000, 16000, 2, 16)


def pieces_of(data: bytes, size: int) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


def read_wave(path: Path) -> tuple[tuple[int, int, int, int], bytes]:
    with wave.open(str(path), "rb") as reader:
        params = (reader.getnchannels(), reader.getsampwidth(), reader.getframerate(), reader.getnframes())
        return params, reader.readframes(reader.getnframes())


@pytest.mark.parametrize("text", ["exported by nurse.liu at 2024-05-01T10:00:00Z", "导出: nurse.liu 2024-05-01", "ab"])
def test_watermark_keeps_samples_and_adds_the_comment(tmp_path: Path, text: str) -> None:
    samples = plaintext(2 * 8000 * 3)  # three seconds
    original = write(tmp_path / "in.wav", wav_bytes(samples))
    digest = watermark_wav(pieces_of(original.read_bytes(), 1001), tmp_path / "out.wav", text)
    out = tmp_path / "out.wav"
    assert digest == sha256_file(out)
    assert read_wave(out) == read_wave(original)
    assert read_wave(out)[1] == samples
    assert read_wav_comment(out) == text
    assert read_wav_comment(original) is None
    data = out.read_bytes()
    assert struct.unpack("<I", data[4:8])[0] == len(data) - 8
    assert data.index(b"LIST") < data.index(b"data")
    assert stat.S_IMODE(out.stat().st_mode) == 0o600


def test_watermark_parses_the_chunk_list(tmp_path: Path) -> None:
    frames = plaintext(999)[:998]
    trailing = riff_chunk(b"LIST", b"INFO" + riff_chunk(b"ISFT", b"editor\x00"))
    source = riff(riff_chunk(b"fmt ", FMT), riff_chunk(b"junk", b"odd"), riff_chunk(b"data", frames), trailing)
    write(tmp_path / "in.wav", source)
    watermark_wav(pieces_of(source, 7), tmp_path / "out.wav", "by nurse.liu")
    out = (tmp_path / "out.wav").read_bytes()
    assert riff_chunk(b"junk", b"odd") in out
    assert out.endswith(trailing)
    assert read_wave(tmp_path / "out.wav") == read_wave(tmp_path / "in.wav")
    assert read_wav_comment(tmp_path / "out.wav") == "by nurse.liu"


def test_watermark_from_a_sealed_recording(tmp_path: Path) -> None:
    original = write(tmp_path / "in.wav", wav_bytes(plaintext(16_000)))
    seal_file(original, tmp_path / "sealed", KEY, context=CONTEXT, chunk_size=4096)
    watermark_wav(open_sealed(tmp_path / "sealed", KEY, context=CONTEXT), tmp_path / "out.wav", "by nurse.liu")
    assert read_wave(tmp_path / "out.wav") == read_wave(original)


@pytest.mark.parametrize(
    ("source", "reason"),
    [
        (b"", "stream: not a RIFF/WAVE file"),
        (b"MHREC\x01" + bytes(40), "stream: not a RIFF/WAVE file"),
        (b"RIFF\x00\x00\x00\x00AVI LIST", "stream: not a RIFF/WAVE file"),
        (riff(riff_chunk(b"fmt ", FMT)), "stream: no data chunk"),
        (riff(riff_chunk(b"fmt ", FMT), b"da"), "stream: truncated chunk header"),
        (
            riff(riff_chunk(b"data", b"\x00\x00"), riff_chunk(b"fmt ", FMT)),
            "stream: no fmt chunk before the data chunk",
        ),
        (riff(riff_chunk(b"fmt ", FMT))[:-4], "stream: truncated 'fmt ' chunk"),
    ],
)
def test_watermark_refuses_what_is_not_a_wav(tmp_path: Path, source: bytes, reason: str) -> None:
    with pytest.raises(EnvelopeError, match=reason):
        watermark_wav([source], tmp_path / "out.wav", "by nurse.liu")
    assert not (tmp_path / "out.wav").exists()


def test_watermark_of_truncated_audio_removes_partial_dst(tmp_path: Path) -> None:
    source = wav_bytes(plaintext(4000))[:-100]
    with pytest.raises(EnvelopeError, match="stream: truncated 'data' chunk: 4000 bytes declared, 3900 present"):
        watermark_wav(pieces_of(source, 512), tmp_path / "out.wav", "by nurse.liu")
    assert not (tmp_path / "out.wav").exists()


def test_watermark_refuses_an_oversized_head(tmp_path: Path) -> None:
    source = riff(riff_chunk(b"fmt ", FMT), riff_chunk(b"junk", bytes(envelope.MAX_WAV_HEADER_BYTES)))
    with pytest.raises(EnvelopeError, match="chunks before the data chunk exceed"):
        watermark_wav(pieces_of(source, 65536), tmp_path / "out.wav", "by nurse.liu")


@pytest.mark.parametrize("text", ["", "nul\x00inside", "x" * envelope.MAX_WATERMARK_BYTES])
def test_bad_watermark_text_is_refused(tmp_path: Path, text: str) -> None:
    with pytest.raises(EnvelopeError, match="a watermark must be"):
        watermark_wav([wav_bytes(b"\x00\x00")], tmp_path / "out.wav", text)
    assert not (tmp_path / "out.wav").exists()
