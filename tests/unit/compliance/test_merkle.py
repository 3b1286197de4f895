"""RFC 9162 Merkle trees: known-answer roots, proofs against a brute-force reference, corrupted proofs refused."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from compliance.merkle import (
    EMPTY_ROOT,
    ProofError,
    TreeAccumulator,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    merkle_root,
    node_hash,
    root_from_leaf_hashes,
    verify_consistency,
    verify_inclusion,
)

# The test vectors of Certificate Transparency's reference implementation (RFC 6962 trees, same as RFC 9162).
KAT_LEAVES = [
    bytes.fromhex(h)
    for h in ["", "00", "10", "2021", "3031", "40414243", "5051525354555657", "606162636465666768696a6b6c6d6e6f"]
]
KAT_ROOTS = {
    1: "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    2: "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    3: "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    4: "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    5: "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    6: "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    7: "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    8: "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
}
MAX_N = 16


# --- brute-force reference: the RFC's recursive definitions, written out literally ------------------------------


def ref_mth(data: Sequence[bytes]) -> bytes:
    n = len(data)
    if n == 0:
        return hashlib.sha256(b"").digest()
    if n == 1:
        return hashlib.sha256(b"\x00" + data[0]).digest()
    k = 1
    while k * 2 < n:
        k *= 2
    return hashlib.sha256(b"\x01" + ref_mth(data[:k]) + ref_mth(data[k:])).digest()


def ref_path(m: int, data: Sequence[bytes]) -> list[bytes]:
    n = len(data)
    if n == 1:
        return []
    k = 1
    while k * 2 < n:
        k *= 2
    if m < k:
        return [*ref_path(m, data[:k]), ref_mth(data[k:])]
    return [*ref_path(m - k, data[k:]), ref_mth(data[:k])]


def ref_subproof(m: int, data: Sequence[bytes], complete: bool) -> list[bytes]:
    n = len(data)
    if m == n:
        return [] if complete else [ref_mth(data)]
    k = 1
    while k * 2 < n:
        k *= 2
    if m <= k:
        return [*ref_subproof(m, data[:k], complete), ref_mth(data[k:])]
    return [*ref_subproof(m - k, data[k:], False), ref_mth(data[:k])]


def data_for(n: int) -> list[bytes]:
    return [f"leaf {i}".encode() for i in range(n)]


def hashes_for(data: Sequence[bytes]) -> list[bytes]:
    return [leaf_hash(d) for d in data]


# --- known answers ------------------------------------------------------------------------------------------


def test_empty_tree_root() -> None:
    assert EMPTY_ROOT.hex() == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert merkle_root([]) == EMPTY_ROOT


@pytest.mark.parametrize("size", sorted(KAT_ROOTS))
def test_known_answer_roots(size: int) -> None:
    assert merkle_root(KAT_LEAVES[:size]).hex() == KAT_ROOTS[size]
    assert ref_mth(KAT_LEAVES[:size]).hex() == KAT_ROOTS[size]


def test_leaf_and_node_hashes_are_domain_separated() -> None:
    a, b = leaf_hash(b"a"), leaf_hash(b"b")
    assert leaf_hash(a + b) != node_hash(a, b)
    assert node_hash(a, b) == hashlib.sha256(b"\x01" + a + b).digest()


def test_accumulator_gives_every_prefix_root() -> None:
    data = data_for(40)
    accumulator = TreeAccumulator()
    for n, d in enumerate(data, start=1):
        accumulator.append(leaf_hash(d))
        assert accumulator.size == n
        assert accumulator.root() == ref_mth(data[:n])
    with pytest.raises(ValueError, match="32 bytes"):
        accumulator.append(b"short")


# --- proofs: every (m, n) up to 16 against the reference ------------------------------------------------------


@pytest.mark.parametrize("n", range(1, MAX_N + 1))
def test_inclusion_proofs_exhaustive(n: int) -> None:
    data = data_for(n)
    hashes = hashes_for(data)
    root = root_from_leaf_hashes(hashes)
    assert root == ref_mth(data)
    for m in range(n):
        proof = inclusion_proof(m, hashes)
        assert proof == ref_path(m, data)
        assert verify_inclusion(m, n, hashes[m], proof, root) is True


@pytest.mark.parametrize("n", range(1, MAX_N + 1))
def test_consistency_proofs_exhaustive(n: int) -> None:
    data = data_for(n)
    hashes = hashes_for(data)
    new_root = ref_mth(data)
    for m in range(n + 1):
        proof = consistency_proof(m, hashes)
        expected = [] if m in (0, n) else ref_subproof(m, data, True)
        assert proof == expected
        assert verify_consistency(m, n, ref_mth(data[:m]), new_root, proof) is True


@given(st.lists(st.binary(max_size=8), min_size=1, max_size=70), st.data())
def test_inclusion_property(data: list[bytes], draw: st.DataObject) -> None:
    m = draw.draw(st.integers(0, len(data) - 1))
    hashes = hashes_for(data)
    proof = inclusion_proof(m, hashes)
    assert proof == ref_path(m, data)
    assert verify_inclusion(m, len(data), hashes[m], proof, ref_mth(data))


@given(st.lists(st.binary(max_size=8), min_size=1, max_size=70), st.data())
def test_consistency_property(data: list[bytes], draw: st.DataObject) -> None:
    m = draw.draw(st.integers(1, len(data)))
    proof = consistency_proof(m, hashes_for(data))
    assert proof == ([] if m == len(data) else ref_subproof(m, data, True))
    assert verify_consistency(m, len(data), ref_mth(data[:m]), ref_mth(data), proof)


def test_generation_refuses_bad_parameters() -> None:
    hashes = hashes_for(data_for(4))
    with pytest.raises(ValueError, match="outside"):
        inclusion_proof(4, hashes)
    with pytest.raises(ValueError, match="outside"):
        inclusion_proof(-1, hashes)
    with pytest.raises(ValueError, match="outside"):
        consistency_proof(5, hashes)
    with pytest.raises(ValueError, match="32"):
        inclusion_proof(0, [b"x", *hashes])


# --- corrupted proofs -----------------------------------------------------------------------------------------


def flip(h: bytes, bit: int) -> bytes:
    b = bytearray(h)
    b[bit // 8 % len(b)] ^= 1 << (bit % 8)
    return bytes(b)


def corruptions(proof: list[bytes], extra: bytes) -> list[tuple[str, list[bytes]]]:
    """Every single-bit flip of every element, plus an element added at each end or removed at each end."""
    variants: list[tuple[str, list[bytes]]] = []
    for i in range(len(proof)):
        for bit in (0, 7, 100, 255):
            variants.append((f"flip bit {bit} of element {i}", [*proof[:i], flip(proof[i], bit), *proof[i + 1 :]]))
    variants.append(("extra element at the end", [*proof, extra]))
    variants.append(("extra element at the start", [extra, *proof]))
    if proof:
        variants.append(("last element missing", proof[:-1]))
        variants.append(("first element missing", proof[1:]))
        variants.append(("truncated element", [*proof[:-1], proof[-1][:31]]))
    return variants


def accepted_inclusion(cases: list[tuple[str, int, int, bytes, list[bytes], bytes]]) -> list[str]:
    """The names of the cases that verify_inclusion wrongly accepts (should be none)."""
    wrong = []
    for what, index, size, leaf, proof, root in cases:
        try:
            verify_inclusion(index, size, leaf, proof, root)
        except ProofError:
            continue
        wrong.append(what)
    return wrong


def accepted_consistency(cases: list[tuple[str, int, int, bytes, bytes, list[bytes]]]) -> list[str]:
    wrong = []
    for what, old_size, new_size, old_root, new_root, proof in cases:
        try:
            verify_consistency(old_size, new_size, old_root, new_root, proof)
        except ProofError:
            continue
        wrong.append(what)
    return wrong


@pytest.mark.parametrize("n", range(1, MAX_N + 1))
def test_corrupted_inclusion_proofs_are_rejected(n: int) -> None:
    data = data_for(n)
    hashes = hashes_for(data)
    root = ref_mth(data)
    for m in range(n):
        proof = inclusion_proof(m, hashes)
        leaf = hashes[m]
        cases = [(what, m, n, leaf, bad, root) for what, bad in corruptions(proof, leaf_hash(b"extra"))]
        # Wrong index: every other index, and out of range.
        cases += [(f"index {w}", w, n, leaf, proof, root) for w in [*range(n), n, n + 1, -1] if w != m]
        # Wrong size (as Certificate Transparency's reference tests: double, half), zero, and index-sized.
        cases += [(f"size {w}", m, w, leaf, proof, root) for w in {2 * n, n // 2, 0, m} if w != n]
        cases.append(("flipped leaf", m, n, flip(leaf, 3), proof, root))
        cases.append(("flipped root", m, n, leaf, proof, flip(root, 9)))
        if n > 1:
            cases.append(("another leaf", m, n, hashes[(m + 1) % n], proof, root))
        assert accepted_inclusion(cases) == [], (n, m)


@pytest.mark.parametrize("n", range(1, MAX_N + 1))
def test_corrupted_consistency_proofs_are_rejected(n: int) -> None:
    data = data_for(n)
    hashes = hashes_for(data)
    new_root = ref_mth(data)
    for m in range(1, n + 1):
        old_root = ref_mth(data[:m])
        proof = consistency_proof(m, hashes)
        cases = [(what, m, n, old_root, new_root, bad) for what, bad in corruptions(proof, leaf_hash(b"extra"))]
        if proof:
            cases += [(f"old size {w}", w, n, old_root, new_root, proof) for w in {m - 1, m + 1, 2 * m, m // 2}]
            # Sizes n +- 1 can share the proof's shape, so only the root (bound to the size by a signed head) tells
            # them apart; double and half (as in Certificate Transparency's reference tests) never can.
            cases += [(f"new size {w}", m, w, old_root, new_root, proof) for w in {2 * n, n // 2}]
        cases.append(("flipped old root", m, n, flip(old_root, 1), new_root, proof))
        cases.append(("flipped new root", m, n, old_root, flip(new_root, 200), proof))
        if m < n:
            cases.append(("swapped roots", m, n, new_root, old_root, proof))
            cases.append(("forked new tree", m, n, old_root, ref_mth([*data[: n - 1], b"forked"]), proof))
        assert accepted_consistency(cases) == [], (n, m)


def test_consistency_edge_cases() -> None:
    data = data_for(5)
    root = ref_mth(data)
    assert verify_consistency(0, 5, EMPTY_ROOT, root, [])
    with pytest.raises(ProofError, match="empty tree"):
        verify_consistency(0, 5, root, root, [])
    with pytest.raises(ProofError, match="no elements"):
        verify_consistency(0, 5, EMPTY_ROOT, root, [root])
    assert verify_consistency(5, 5, root, root, [])
    with pytest.raises(ProofError, match="different roots"):
        verify_consistency(5, 5, root, flip(root, 0), [])
    with pytest.raises(ProofError, match="not within"):
        verify_consistency(6, 5, root, root, [root])
    with pytest.raises(ProofError, match="empty consistency proof"):
        verify_consistency(3, 5, ref_mth(data[:3]), root, [])
    with pytest.raises(ProofError, match="32"):
        verify_consistency(3, 5, b"short", root, [root])


def test_inclusion_edge_cases() -> None:
    h = leaf_hash(b"only")
    assert verify_inclusion(0, 1, h, [], h)
    with pytest.raises(ProofError, match="empty tree"):
        verify_inclusion(0, 0, h, [], h)
    with pytest.raises(ProofError, match="more than"):
        verify_inclusion(0, 1, h, [h], h)
    with pytest.raises(ProofError, match="root hash has"):
        verify_inclusion(0, 1, h, [], b"")
