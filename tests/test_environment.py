"""The compute environment recorded with every round and cell: what it holds, its id, its wire form."""

from __future__ import annotations

import json

import numpy as np
import torch

from fcl_flower.environment import (
    ENVIRONMENT, MAX_ENVIRONMENT_CHARS, compute_environment, describe, environment_id, environment_metric,
    environment_record, merge_records, read_environment,
)


def test_it_names_this_process_packages_and_kernel_dispatch(monkeypatch) -> None:
    for name in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "NPY_DISABLE_CPU_FEATURES"):
        monkeypatch.delenv(name, raising=False)
    env = compute_environment()
    assert env["torch"] == torch.__version__ and env["numpy"] == np.__version__
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and env["cpu"]
    assert env["kernel_limits"] == "" and all(isinstance(v, str) for v in env.values())
    assert "threads" not in env  # the config sets the threads, so they must not split one machine into two ids
    # the id is a content id: the same on every call, other for any changed field, and a setting that limits
    # oneDNN's instruction set (which changes a cell's last bits) is part of it
    assert environment_id(env) == environment_id(compute_environment()) == environment_id(dict(reversed(env.items())))
    assert len(environment_id(env)) == 8 and int(environment_id(env), 16) >= 0
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    limited = compute_environment()
    assert limited["kernel_limits"] == "ONEDNN_MAX_CPU_ISA=AVX2" and environment_id(limited) != environment_id(env)
    assert describe(limited).endswith("ONEDNN_MAX_CPU_ISA=AVX2") and f"torch {torch.__version__}" in describe(limited)


def test_wire_form_round_trips_and_bad_values_read_as_none() -> None:
    assert read_environment(environment_metric()) == compute_environment()
    swollen = json.dumps({**compute_environment(), "padding": "x" * MAX_ENVIRONMENT_CHARS})
    for bad in (None, 3.0, "", "not json", "[1, 2]", json.dumps({"torch": 2}), b"{}", swollen):
        assert read_environment(bad) is None


def test_record_names_each_site_and_leaves_out_those_without_one() -> None:
    server = compute_environment()
    other = {**server, "cpu_capability": "AVX2"}
    record = environment_record(server, {
        "site_01": {"site": "site_01", ENVIRONMENT: json.dumps(other)},
        "site_00": {"site": "site_00", ENVIRONMENT: environment_metric(), "loss": 1.0},
        "site_02": {"site": "site_02"},  # an older client: sends none
        "site_03": {"site": "site_03", ENVIRONMENT: "{garbled"},
    })
    assert record["server"] == environment_id(server)
    assert record["sites"] == {"site_00": environment_id(server), "site_01": environment_id(other)}
    assert record["described"] == {environment_id(server): server, environment_id(other): other}
    json.dumps(record)  # stored as JSON


def test_merged_record_joins_the_ids_of_a_site_seen_in_two_environments() -> None:
    a = compute_environment()
    b = {**a, "torch": "0.0"}
    first = environment_record(a, {"s0": {ENVIRONMENT: json.dumps(a)}, "s1": {ENVIRONMENT: json.dumps(a)}})
    second = environment_record(a, {"s0": {ENVIRONMENT: json.dumps(b)}, "s1": {ENVIRONMENT: json.dumps(a)}})
    merged = merge_records([first, second, first])
    assert merged["server"] == environment_id(a)
    assert merged["sites"]["s1"] == environment_id(a)
    assert merged["sites"]["s0"] == "+".join(sorted([environment_id(a), environment_id(b)]))
    assert set(merged["described"]) == {environment_id(a), environment_id(b)}

