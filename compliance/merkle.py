"""Merkle tree hashing and proofs of RFC 9162 (Certificate Transparency v2), sans I/O.

* leaf hash ``SHA-256(0x00 || data)``, interior node hash ``SHA-256(0x01 || left || right)``; the two prefixes
  keep a leaf from ever being passed off as an interior node (second-preimage resistance);
* ``MTH(D[n])`` splits a list of ``n > 1`` leaves at ``k``, the largest power of two smaller than ``n``; the
  hash of the empty tree is ``SHA-256("")``;
* inclusion proofs (``PATH(m, D[n])``, RFC 9162 §2.1.3) and consistency proofs (``PROOF(m, D[n])``, §2.1.4),
  generated from leaf hashes and verified with the RFC's iterative algorithms.

Leaf indexes are 0-based. Verification returns ``True`` or raises :class:`ProofError`, whose message says
what is wrong; it never returns ``False``, so a forgotten ``if`` cannot turn a bad proof into a good one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Final

HASH_SIZE: Final = 32
EMPTY_ROOT: Final = hashlib.sha256(b"").digest()
_LEAF_PREFIX: Final = b"\x00"
_NODE_PREFIX: Final = b"\x01"


class ProofError(ValueError):
    """An inclusion or consistency proof, or its parameters, do not verify; the message says why."""


def leaf_hash(data: bytes) -> bytes:
    """``SHA-256(0x00 || data)``."""
    return hashlib.sha256(_LEAF_PREFIX + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """``SHA-256(0x01 || left || right)``."""
    return hashlib.sha256(_NODE_PREFIX + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two smaller than ``n`` (``n >= 2``)."""
    return 1 << ((n - 1).bit_length() - 1)


def root_from_leaf_hashes(hashes: Sequence[bytes]) -> bytes:
    """``MTH`` of the tree whose leaves have the given leaf hashes."""
    accumulator = TreeAccumulator()
    for h in hashes:
        accumulator.append(h)
    return accumulator.root()


def merkle_root(leaves: Sequence[bytes]) -> bytes:
    """``MTH(D[n])`` of the leaf data ``leaves``."""
    return root_from_leaf_hashes([leaf_hash(leaf) for leaf in leaves])


class TreeAccumulator:
    """Grows a tree one leaf hash at a time and gives the root of the tree so far (a compact range).

    Keeps only the roots of the perfect subtrees the size decomposes into (one per bit set in the size), so the
    roots after every append cost O(log n) memory: the verifier uses it to check every signed head in one pass.
    """

    def __init__(self) -> None:
        self._size = 0
        # (height, hash) of perfect subtrees, largest (leftmost) first.
        self._stack: list[tuple[int, bytes]] = []

    @property
    def size(self) -> int:
        return self._size

    def append(self, leaf: bytes) -> None:
        if len(leaf) != HASH_SIZE:
            raise ValueError(f"a leaf hash has {HASH_SIZE} bytes, got {len(leaf)}")
        height, h = 0, leaf
        while self._stack and self._stack[-1][0] == height:
            _, left = self._stack.pop()
            h = node_hash(left, h)
            height += 1
        self._stack.append((height, h))
        self._size += 1

    def root(self) -> bytes:
        if not self._stack:
            return EMPTY_ROOT
        h = self._stack[-1][1]
        for _, left in reversed(self._stack[:-1]):
            h = node_hash(left, h)
        return h


def _subtree_root(hashes: Sequence[bytes], start: int, stop: int) -> bytes:
    return root_from_leaf_hashes(hashes[start:stop])


def _check_hashes(hashes: Sequence[bytes]) -> None:
    for i, h in enumerate(hashes):
        if len(h) != HASH_SIZE:
            raise ValueError(f"leaf hash {i} has {len(h)} bytes, expected {HASH_SIZE}")


def inclusion_proof(index: int, hashes: Sequence[bytes]) -> list[bytes]:
    """``PATH(index, D[n])`` for the tree of leaf hashes ``hashes`` (RFC 9162 §2.1.3.1), leaf level first."""
    n = len(hashes)
    if not 0 <= index < n:
        raise ValueError(f"leaf index {index} is outside a tree of size {n}")
    _check_hashes(hashes)
    path: list[bytes] = []
    start, stop, m = 0, n, index
    # Walk down from the root, collecting the sibling subtree at each split; reversed at the end.
    while stop - start > 1:
        k = _split(stop - start)
        if m < k:
            path.append(_subtree_root(hashes, start + k, stop))
            stop = start + k
        else:
            path.append(_subtree_root(hashes, start, start + k))
            start, m = start + k, m - k
    path.reverse()
    return path


def consistency_proof(old_size: int, hashes: Sequence[bytes]) -> list[bytes]:
    """``PROOF(old_size, D[n])`` (RFC 9162 §2.1.4.1): the tree of the first ``old_size`` leaves is a prefix.

    Empty when ``old_size`` is 0 or equals ``n`` (nothing to prove).
    """
    n = len(hashes)
    if not 0 <= old_size <= n:
        raise ValueError(f"old size {old_size} is outside 0..{n}")
    _check_hashes(hashes)
    if old_size in (0, n):
        return []
    proof: list[bytes] = []
    start, stop, m, complete = 0, n, old_size, True
    # SUBPROOF(m, D[start:stop], complete), iteratively; the elements come out root level first.
    while True:
        size = stop - start
        if m == size:
            if not complete:
                proof.append(_subtree_root(hashes, start, stop))
            break
        k = _split(size)
        if m <= k:
            proof.append(_subtree_root(hashes, start + k, stop))
            stop = start + k
        else:
            proof.append(_subtree_root(hashes, start, start + k))
            start, m, complete = start + k, m - k, False
    proof.reverse()
    return proof


def _check_hash(name: str, value: bytes) -> None:
    if len(value) != HASH_SIZE:
        raise ProofError(f"{name} has {len(value)} bytes, expected {HASH_SIZE}")


def root_from_inclusion_proof(index: int, size: int, leaf: bytes, proof: Sequence[bytes]) -> bytes:
    """The root an inclusion proof leads to (RFC 9162 §2.1.3.2, steps 1-5 without the final comparison)."""
    if size < 1:
        raise ProofError(f"tree size {size}: an empty tree includes no leaf")
    if not 0 <= index < size:
        raise ProofError(f"leaf index {index} is outside a tree of size {size}")
    _check_hash("leaf hash", leaf)
    fn, sn, r = index, size - 1, leaf
    for i, p in enumerate(proof):
        _check_hash(f"proof element {i}", p)
        if sn == 0:
            raise ProofError(f"proof has {len(proof)} elements, more than a tree of size {size} needs")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError(f"proof has {len(proof)} elements, fewer than leaf {index} of a tree of size {size} needs")
    return r


def verify_inclusion(index: int, size: int, leaf: bytes, proof: Sequence[bytes], root: bytes) -> bool:
    """Check that the leaf with hash ``leaf`` is at ``index`` of the tree of ``size`` leaves with root ``root``."""
    _check_hash("root hash", root)
    if root_from_inclusion_proof(index, size, leaf, proof) != root:
        raise ProofError(f"inclusion proof of leaf {index} does not lead to the root of the tree of size {size}")
    return True


def verify_consistency(old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]) -> bool:
    """Check that the tree of ``old_size`` leaves is a prefix of the tree of ``new_size`` (RFC 9162 §2.1.4.2)."""
    _check_hash("old root hash", old_root)
    _check_hash("new root hash", new_root)
    if not 0 <= old_size <= new_size:
        raise ProofError(f"old size {old_size} is not within 0..{new_size} (new size)")
    for i, c in enumerate(proof):
        _check_hash(f"proof element {i}", c)
    if old_size == 0:
        # Every tree extends the empty tree; there is nothing to prove (RFC 6962 defines proofs for 0 < m only).
        if proof:
            raise ProofError("a consistency proof from the empty tree has no elements")
        if old_root != EMPTY_ROOT:
            raise ProofError("old root is not the hash of the empty tree")
        return True
    if old_size == new_size:
        if proof:
            raise ProofError("a consistency proof between trees of the same size has no elements")
        if old_root != new_root:
            raise ProofError(f"two different roots for the same tree size {old_size}")
        return True
    if not proof:
        raise ProofError(f"empty consistency proof from size {old_size} to {new_size}")
    path = list(proof)
    if old_size & (old_size - 1) == 0:
        # The old tree is a perfect subtree: its root is the first node of the path.
        path.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise ProofError(f"proof has {len(proof)} elements, more than sizes {old_size}->{new_size} need")
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError(f"proof has {len(proof)} elements, fewer than sizes {old_size}->{new_size} need")
    if fr != old_root:
        raise ProofError(f"consistency proof does not lead to the old root (size {old_size})")
    if sr != new_root:
        raise ProofError(f"consistency proof does not lead to the new root (size {new_size})")
    return True
