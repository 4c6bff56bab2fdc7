"""Bank wire format: npy round trips, garbage rejection, metrics/config helpers."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest

from fcl_flower import wire


@pytest.mark.parametrize(
    "array",
    [
        np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32),
        np.random.default_rng(1).normal(size=(5, 8)).astype(np.float16),
        np.arange(7, dtype=np.int64),
        np.zeros((0, 16), np.float32),
    ],
)
def test_encode_decode_round_trip(array: np.ndarray) -> None:
    decoded = wire.decode_array(wire.encode_array(array))
    assert decoded.dtype == array.dtype and decoded.shape == array.shape
    np.testing.assert_array_equal(decoded, array)


def _npz_bytes() -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, a=np.zeros(3))
    return buffer.getvalue()


@pytest.mark.parametrize(
    "garbage",
    [
        b"",
        b"not an array at all",
        pickle.dumps({"evil": 1}),
        wire.encode_array(np.zeros(10))[:-3],
        wire.encode_array(np.zeros(3)) + b"x",
        _npz_bytes(),
        "a string, not bytes",
        3.0,
    ],
)
def test_decode_garbage_raises_value_error(garbage: object) -> None:
    with pytest.raises(ValueError):
        wire.decode_array(garbage)  # type: ignore[arg-type]


def test_encode_refuses_object_arrays() -> None:
    with pytest.raises(ValueError):
        wire.encode_array(np.array([{"a": 1}], dtype=object))


def test_bank_metrics_round_trip() -> None:
    features = np.eye(4, 3, dtype=np.float16)
    partitions = np.array([0, 1, 2, 3], dtype=np.int32)
    metrics = wire.bank_to_metrics(features, partitions)
    assert set(metrics) == {wire.BANK_FEATURES, wire.BANK_PARTITIONS}
    assert all(isinstance(v, bytes) for v in metrics.values())
    decoded = wire.bank_from_metrics({**metrics, "loss": 0.5})
    assert decoded is not None
    f, p = decoded
    assert f.dtype == np.float16 and p.dtype == np.int64
    np.testing.assert_array_equal(f, features)
    np.testing.assert_array_equal(p, partitions)


def test_bank_from_metrics_absent_partial_and_bad_shapes() -> None:
    assert wire.bank_from_metrics({"loss": 1.0}) is None
    metrics = wire.bank_to_metrics(np.ones((2, 3), np.float32), np.zeros(2))
    with pytest.raises(ValueError, match="incomplete"):
        wire.bank_from_metrics({wire.BANK_FEATURES: metrics[wire.BANK_FEATURES]})
    with pytest.raises(ValueError):
        wire.bank_from_metrics({**metrics, wire.BANK_FEATURES: b"junk"})
    with pytest.raises(ValueError):
        wire.bank_to_metrics(np.ones((2, 3), np.float32), np.zeros(3))


def test_remote_config_round_trip_returns_float32() -> None:
    features = np.full((3, 2), 0.5, np.float16)
    partitions = np.array([1, 0, 1])
    config = wire.remote_bank_to_config(features, partitions, n_sites=2)
    assert config[wire.REMOTE_SITES] == 2 and config[wire.REMOTE_ROWS] == 3
    decoded = wire.remote_bank_from_config(config)
    assert decoded is not None
    f, p = decoded
    assert f.dtype == np.float32 and p.dtype == np.int64
    np.testing.assert_array_equal(f, features.astype(np.float32))
    np.testing.assert_array_equal(p, partitions)


def test_remote_config_absent_and_inconsistent() -> None:
    assert wire.remote_bank_from_config({"lr": 0.1}) is None
    config = wire.remote_bank_to_config(np.ones((3, 2), np.float32), np.zeros(3), 1)
    with pytest.raises(ValueError, match="remote.rows"):
        wire.remote_bank_from_config({**config, wire.REMOTE_ROWS: 4})
    with pytest.raises(ValueError, match="incomplete"):
        wire.remote_bank_from_config({wire.REMOTE_FEATURES: config[wire.REMOTE_FEATURES]})
    with pytest.raises(ValueError, match="dtypes"):
        wire.remote_bank_from_config(
            {**config, wire.REMOTE_FEATURES: wire.encode_array(np.ones((3, 2), np.int64))}
        )
