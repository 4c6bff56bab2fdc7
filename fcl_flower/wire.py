"""Wire format of the feature banks that travel between sites and the server, and the checks of
what a site sends back: its weights (``update_problem``) and its metrics (``result_problem``).

Numpy only (no Flower, no torch): the client adapter and the server strategy both use
it. Arrays travel as ``.npy`` bytes written and read with ``allow_pickle=False``, so a
message can never make the receiver unpickle anything.

Client to server, in ``FitRes.metrics``:

- ``bank.features`` (``BANK_FEATURES``): npy bytes, ``(N, d)`` float32 or float16, rows
  L2-normalised projection-head outputs of the site's local queue.
- ``bank.partitions`` (``BANK_PARTITIONS``): npy bytes, ``(N,)`` int64 partition ids.
- ``site`` (``SITE``): str, the site's stable name (see ``strategies.feature_exchange``).

Server to client, in ``FitIns.config`` (all four keys absent: no remote bank this round):

- ``remote.features`` (``REMOTE_FEATURES``): npy bytes, ``(M, d)`` float16 or float32,
  the banks of the other sites concatenated.
- ``remote.partitions`` (``REMOTE_PARTITIONS``): npy bytes, ``(M,)`` int64.
- ``remote.sites`` (``REMOTE_SITES``): int, how many other sites contributed rows.
- ``remote.rows`` (``REMOTE_ROWS``): int, ``M``.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

SITE = "site"
BANK_FEATURES = "bank.features"
BANK_PARTITIONS = "bank.partitions"
BANK_KEYS = (BANK_FEATURES, BANK_PARTITIONS)
REMOTE_FEATURES = "remote.features"
REMOTE_PARTITIONS = "remote.partitions"
REMOTE_SITES = "remote.sites"
REMOTE_ROWS = "remote.rows"
REMOTE_KEYS = (REMOTE_FEATURES, REMOTE_PARTITIONS, REMOTE_SITES, REMOTE_ROWS)


def encode_array(a: np.ndarray) -> bytes:
    """Serialise an array as ``.npy`` bytes (no pickling; object arrays are refused).

    Raises:
        ValueError: ``a`` has an object dtype.
    """
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(a), allow_pickle=False)
    return buffer.getvalue()


def decode_array(b: bytes) -> np.ndarray:
    """Read ``.npy`` bytes written by ``encode_array`` (never unpickles).

    Raises:
        ValueError: ``b`` is not bytes, or not one complete ``.npy`` array.
    """
    if not isinstance(b, (bytes, bytearray)):
        raise ValueError(f"expected .npy bytes, got {type(b).__name__}")
    buffer = io.BytesIO(b)
    try:
        array = np.load(buffer, allow_pickle=False)
    except Exception as exc:  # numpy raises ValueError, EOFError, OSError, ... on garbage
        raise ValueError(f"not a valid .npy array ({len(b)} bytes): {exc}") from exc
    if not isinstance(array, np.ndarray):  # an .npz archive loads as NpzFile
        raise ValueError(f"not a single .npy array ({len(b)} bytes)")
    if buffer.tell() != len(b):
        raise ValueError(f"{len(b) - buffer.tell()} trailing bytes after the .npy array")
    return array


def _check_bank(features: np.ndarray, partitions: np.ndarray) -> None:
    """Shapes only: ``features`` (N, d), ``partitions`` (N,)."""
    if features.ndim != 2 or partitions.ndim != 1 or len(features) != len(partitions):
        raise ValueError(
            f"a bank needs features (N, d) and partitions (N,), got {features.shape} "
            f"and {partitions.shape}"
        )


def _encode_bank(features: np.ndarray, partitions: np.ndarray) -> tuple[bytes, bytes]:
    """``features`` (N, d) as sent and ``partitions`` (N,) as int64, each as npy bytes.

    Raises:
        ValueError: shapes do not match.
    """
    features, partitions = np.asarray(features), np.asarray(partitions)
    _check_bank(features, partitions)
    return encode_array(features), encode_array(partitions.astype(np.int64, copy=False))


def bank_to_metrics(features: np.ndarray, partitions: np.ndarray) -> dict[str, bytes]:
    """The local bank as ``FitRes.metrics`` entries.

    Args:
        features: ``(N, d)`` float32 or float16, sent with its dtype.
        partitions: ``(N,)`` integer partition ids, sent as int64.

    Raises:
        ValueError: shapes do not match.
    """
    encoded_features, encoded_partitions = _encode_bank(features, partitions)
    return {BANK_FEATURES: encoded_features, BANK_PARTITIONS: encoded_partitions}


def bank_from_metrics(metrics: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray] | None:
    """Decode the bank a client sent; ``None`` when it sent none.

    Only decodes: dtypes, shapes and values are returned as sent and are checked by the
    receiver (``strategies.feature_exchange``).

    Returns:
        ``(features, partitions)`` as decoded, or ``None`` if neither key is present.

    Raises:
        ValueError: only one of the two keys is present, or a value does not decode.
    """
    present = [key for key in BANK_KEYS if key in metrics]
    if not present:
        return None
    if len(present) != len(BANK_KEYS):
        raise ValueError(f"incomplete bank: only {present} present")
    return decode_array(metrics[BANK_FEATURES]), decode_array(metrics[BANK_PARTITIONS])


def remote_bank_to_config(
    features: np.ndarray, partitions: np.ndarray, n_sites: int
) -> dict[str, bytes | int]:
    """The remote bank for one site as ``FitIns.config`` entries.

    Args:
        features: ``(M, d)`` float16 or float32, sent with its dtype.
        partitions: ``(M,)`` integer partition ids, sent as int64.
        n_sites: how many other sites contributed rows.

    Raises:
        ValueError: shapes do not match.
    """
    encoded_features, encoded_partitions = _encode_bank(features, partitions)
    return {
        REMOTE_FEATURES: encoded_features,
        REMOTE_PARTITIONS: encoded_partitions,
        REMOTE_SITES: int(n_sites),
        REMOTE_ROWS: len(features),
    }


def remote_bank_from_config(
    config: Mapping[str, Any],
) -> tuple[np.ndarray, np.ndarray] | None:
    """Decode the remote bank the server sent; ``None`` when it sent none.

    Returns:
        ``(features, partitions)``: ``(M, d)`` float32 and ``(M,)`` int64, or ``None``
        if ``remote.features`` is absent.

    Raises:
        ValueError: keys missing, undecodable values, or inconsistent shapes/``remote.rows``.
    """
    if REMOTE_FEATURES not in config:
        return None
    missing = [key for key in REMOTE_KEYS if key not in config]
    if missing:
        raise ValueError(f"incomplete remote bank: {missing} missing")
    features = decode_array(config[REMOTE_FEATURES])
    partitions = decode_array(config[REMOTE_PARTITIONS])
    _check_bank(features, partitions)
    if len(features) != config[REMOTE_ROWS]:
        raise ValueError(
            f"remote bank has {len(features)} rows, remote.rows says {config[REMOTE_ROWS]}"
        )
    if features.dtype not in (np.float16, np.float32) or partitions.dtype.kind not in "iu":
        raise ValueError(f"remote bank has dtypes {features.dtype}/{partitions.dtype}")
    return features.astype(np.float32), partitions.astype(np.int64)


def is_number(value: Any) -> bool:
    """An int or a float, not a bool: a value the server can compute with (NaN included)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def update_problem(arrays: list[np.ndarray], num_examples: int, reference: list[tuple[int, ...]]) -> str | None:
    """Why a site's returned weights cannot be averaged into the global model, or None.

    Args:
        arrays: the weights the site sent back.
        num_examples: its FedAvg weight.
        reference: the shapes of the weights the server sent, in order.

    A wrong number of arrays, a wrong shape, a NaN or Inf, or a weight below 1 is a problem:
    averaged in, any of them would crash the aggregation or spoil every site's model. The
    messages hold no quotes: the server reads a failure's reason up to the first quote.
    """
    if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 1:
        return f"num_examples is {num_examples}, not an int of at least 1"
    if len(arrays) != len(reference):
        return f"{len(arrays)} weight arrays, expected {len(reference)}"
    for i, (array, shape) in enumerate(zip(arrays, reference, strict=True)):
        if array.shape != tuple(shape):
            return f"weight array {i} has shape {array.shape}, expected {tuple(shape)}"
        if array.dtype.kind in "fc" and not np.isfinite(array).all():
            return f"weight array {i} holds NaN or Inf"
    return None


def result_problem(metrics: Mapping[str, Any], required: Sequence[str], taken: set[str]) -> str | None:
    """Why the server cannot use a site's result, or None.

    Args:
        metrics: the result's metrics.
        required: metrics that must be numbers (int or float; NaN allowed).
        taken: site names already used by other results of the same message.

    The messages hold no quotes (see ``update_problem``).
    """
    site = metrics.get(SITE)
    if not isinstance(site, str) or not site:
        return f"no site name (the {SITE} metric is {type(site).__name__}, not a non-empty str)"
    if site in taken:
        return f"another result of this message already reported site {site}"
    for key in required:
        value = metrics.get(key)
        if not is_number(value):
            return f"the {key} metric is {type(value).__name__}, not a number"
    return None
