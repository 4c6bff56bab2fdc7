"""The ``fcl-flower`` command line: thin subcommands that call into the package.

Every subcommand that runs an experiment takes dotlist overrides of ``conf/default.yaml``
(``fcl-flower simulate sites=3 rounds=2``). Heavy imports happen inside the
subcommand so that ``fcl-flower --help`` is instant.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Sequence

from fcl_flower.config import ConfigError, load_config


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. sites=3 rounds=2")
    parser.add_argument("--config", dest="config_file", default=None, help="a YAML file applied before the overrides")


def _cmd_make_synthetic(args: argparse.Namespace) -> int:
    import time

    from fcl_flower.data.synthetic import PatientVariation, generate_dataset

    cfg = load_config(args.overrides, args.config_file)
    sites = args.sites if args.sites is not None else cfg.sites
    patients = args.patients_per_site if args.patients_per_site is not None else cfg.synthetic.patients_per_site
    seed = args.seed if args.seed is not None else cfg.seed
    start = time.perf_counter()
    manifest = generate_dataset(
        Path(args.out),
        sites=sites,
        patients_per_site=patients,
        seed=seed,
        image_size=cfg.synthetic.image_size,
        spacing=cfg.synthetic.spacing,
        cine=args.cine or bool(cfg.data.use_4d_frames),
        variation=PatientVariation.of(cfg.synthetic),
    )
    print(f"wrote {sites} sites x {patients} patients to {args.out} in "
          f"{time.perf_counter() - start:.1f} s (manifest: {manifest})")
    return 0


def _cmd_inspect_data(args: argparse.Namespace) -> int:
    from fcl_flower.data.inspect import inspect_dataset, write_montage

    report = inspect_dataset(Path(args.root), fmt=args.format)
    print(report.summary())
    if args.montage:
        write_montage(report, Path(args.montage), slices=args.montage_slices)
        print(f"montage written to {args.montage}")
    return 1 if report.problems else 0


def _cmd_simulate(args: argparse.Namespace) -> int:
    from fcl_flower.runner import simulate

    return simulate(load_config(args.overrides, args.config_file))


def finetune_overrides(encoder: str, overrides: Sequence[str]) -> list[str]:
    """The dotlist of ``fcl-flower finetune``: fine-tuning only, from ``encoder`` (absolute), then the user's."""
    path = Path(encoder).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"--encoder {path} does not exist")
    return ["stages=[finetune]", "finetune.init=auto", f"finetune.encoder={path}", *overrides]


def _cmd_finetune(args: argparse.Namespace) -> int:
    from fcl_flower.runner import simulate

    return simulate(load_config(finetune_overrides(args.encoder, args.overrides), args.config_file))


def _cmd_certs(args: argparse.Namespace) -> int:
    from fcl_flower.certs import CertsError, describe_certificate, generate_certs, site_names

    try:
        names = site_names(args.sites, args.site_names.split(",") if args.site_names else None)
        paths = generate_certs(Path(args.out), names, args.san, force=args.force, supernode_keys_only=args.supernode_keys_only)
    except CertsError as exc:
        print(f"fcl-flower: {exc}", file=sys.stderr)
        return 2
    if not args.supernode_keys_only:
        print(f"CA:        {paths.ca_cert} (key {paths.ca_key}: keep it offline)")
        print(f"SuperLink: {paths.superlink_cert} + {paths.superlink_key}")
        print(f"           {describe_certificate(paths.superlink_cert)}")
    for name in names:
        print(f"SuperNode {name}: private key {paths.supernode_key(name)} (stays at the site), "
              f"public key {paths.supernode_pub(name)} (register with: flwr supernode register)")
    return 0


def _cmd_deploy_local(args: argparse.Namespace) -> int:
    from fcl_flower.deploy import deploy_local

    return deploy_local(load_config(args.overrides, args.config_file), sites=args.sites)


def _cmd_bench(args: argparse.Namespace) -> int:
    """``fcl-flower bench [OPTIONS]``: every option goes to ``simulations/benchmark.py`` (see main)."""
    import importlib.util

    from fcl_flower.runner import APP_DIR

    path = APP_DIR / "simulations" / "benchmark.py"
    if not path.is_file():
        raise ConfigError(f"{path} is missing: fcl-flower bench runs from a checkout (pip install -e .)")
    spec = importlib.util.spec_from_file_location("fcl_benchmark", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.main(args.bench_args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fcl-flower", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-synthetic", help="write the multi-site synthetic cardiac MRI dataset as NIfTI")
    p.add_argument("--out", required=True, help="output folder (one sub-folder per site)")
    p.add_argument("--sites", type=int, default=None, help="default: config 'sites'")
    p.add_argument("--patients-per-site", type=int, default=None, help="default: config 'synthetic.patients_per_site'")
    p.add_argument("--seed", type=int, default=None, help="default: config 'seed'")
    p.add_argument("--cine", action="store_true",
                   help="also write every patient's whole cardiac cycle as patientNNN_4d.nii.gz "
                        "(default: config 'data.use_4d_frames')")
    _add_config_args(p)
    p.set_defaults(func=_cmd_make_synthetic)

    p = sub.add_parser("inspect-data", help="summarise a dataset and list every problem in it")
    p.add_argument("root", help="dataset folder: site sub-folders, or one ACDC / MSD folder")
    p.add_argument("--format", default="auto", choices=["auto", "synthetic", "acdc", "msd"])
    p.add_argument("--montage", default=None, help="write a PNG montage of slices with label overlays")
    p.add_argument("--montage-slices", type=int, default=8)
    p.set_defaults(func=_cmd_inspect_data)

    p = sub.add_parser("simulate", help="run pre-training (and fine-tuning) on Flower's Ray simulation engine")
    _add_config_args(p)
    p.set_defaults(func=_cmd_simulate)

    p = sub.add_parser(
        "finetune", help="fine-tune an existing pre-trained encoder (local k-fold and/or federated) on the simulation engine"
    )
    p.add_argument("--encoder", required=True, help="encoder file written by pre-training (e.g. runs/default/encoder.pt)")
    _add_config_args(p)
    p.set_defaults(func=_cmd_finetune)

    p = sub.add_parser("certs", help="make a CA, the SuperLink TLS certificate and SuperNode auth keys")
    p.add_argument("--out", required=True, help="output folder (ca.crt, superlink.crt/.key, supernodes/<site>[.pub])")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--sites", type=int, default=None, help="N SuperNode key pairs named site_00 .. site_{N-1}")
    who.add_argument("--site-names", default=None, help="comma-separated SuperNode names, e.g. hospital-a,hospital-b")
    p.add_argument("--san", action="append", default=[], metavar="HOST",
                   help="extra DNS name or IP address of the SuperLink (repeatable); localhost, 127.0.0.1, ::1 always")
    p.add_argument("--supernode-keys-only", action="store_true",
                   help="write only the SuperNode key pairs (a site making its own key)")
    p.add_argument("--force", action="store_true", help="overwrite existing keys and certificates")
    p.set_defaults(func=_cmd_certs)

    p = sub.add_parser("deploy-local", help="a real TLS + node-auth federation on this machine: SuperLink + one SuperNode per site")
    p.add_argument("--sites", type=int, default=None, help="number of SuperNodes (default: the config's 'sites')")
    _add_config_args(p)
    p.set_defaults(func=_cmd_deploy_local)

    p = sub.add_parser(
        "bench",
        help="benchmark suite (trainer, round time, relay bytes, scale, deployment start-up): docs/BENCHMARKS.md",
    )
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="options of simulations/benchmark.py (--quick, --help)")
    p.set_defaults(func=_cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # its options (--quick, --help, ...) belong to simulations/benchmark.py
        args = argparse.Namespace(func=_cmd_bench, bench_args=argv[1:])
    else:
        args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    from fcl_flower.data.errors import DataError
    from fcl_flower.processes import FlowerProcessError

    try:
        return func(args)
    except (ConfigError, DataError, FlowerProcessError) as exc:
        print(f"fcl-flower: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
