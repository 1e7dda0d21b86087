"""``velo-proxy`` command line.

    velo-proxy serve [--upstream-base-url URL] [--port 8080] [... one flag per VELO_* setting]
    velo-proxy models export [--out DIR] [--force]
    velo-proxy models export --embedder all-MiniLM-L6-v2-int8 [--out DIR]
    velo-proxy models export --embedder multilingual-e5-small [--out DIR] [--precision q4|int8|fp32]
    velo-proxy models export [--embedder NAME] --verifier e5-pair-verifier [--verifier-out DIR]
    velo-proxy retrain [--redis-url URL] [--policy-dir DIR] [...]   (training extra)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

from pydantic import ValidationError

from velo_proxy.settings import (DEFAULT_EMBEDDER_NAME, DEFAULT_VERIFIER_NAME, E5_VERIFIER_NAME, ENGLISH_VERIFIER_NAME,
                                 MINILM_INT8_EMBEDDER_NAME, Settings, default_home)

E5_EMBEDDER = "multilingual-e5-small"


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per settings field; values are parsed by the settings class itself."""
    for name, field in Settings.model_fields.items():
        help_text = (field.description or "").replace("%", "%%") + f" [env VELO_{name.upper()}]"
        parser.add_argument(_flag(name), dest=name, default=None, metavar=name.upper(), help=help_text)


def _settings_from(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    for name, field in Settings.model_fields.items():
        value = getattr(args, name, None)
        if value is None:
            continue
        annotation = str(field.annotation)
        if annotation.startswith("dict"):
            value = json.loads(value)
        overrides[name] = value
    return Settings(**overrides)


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # litellm logs request details (including headers) at debug level; keep it quiet.
    for noisy in ("LiteLLM", "litellm", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from velo_proxy.app import create_app

    settings = _settings_from(args)
    _configure_logging(settings.log_level)
    if not settings.upstream_base_url and not settings.model_map:
        logging.getLogger("velo_proxy").warning(
            "no upstream configured (--upstream-base-url / VELO_UPSTREAM_BASE_URL): only cache hits can be served")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level,
                access_log=settings.log_level == "debug", timeout_graceful_shutdown=10)
    return 0


def cmd_models_export(args: argparse.Namespace) -> int:
    from velo_proxy.model_export import ExportError, export_embedder

    _configure_logging("info")
    if args.embedder == E5_EMBEDDER:
        status = _export_e5(args)
    elif args.precision is not None:
        print(f"velo-proxy: --precision applies to --embedder {E5_EMBEDDER} only", file=sys.stderr)
        return 2
    else:
        configured = Settings()
        if args.out:
            out = Path(args.out)
        elif args.embedder == configured.embedder:  # VELO_EMBEDDER_DIR names this embedder's directory
            out = configured.embedder_dir
        else:
            out = default_home() / "models" / args.embedder
        precision = "int8" if args.embedder == MINILM_INT8_EMBEDDER_NAME else "fp32"
        try:
            path = export_embedder(out, precision=precision, force=args.force)
        except ExportError as exc:
            print(f"velo-proxy: embedder not exported: {exc}", file=sys.stderr)
            return 1
        hint = ""
        if args.out:
            hint = f" (serve with VELO_EMBEDDER_DIR={path})"
        elif args.embedder != DEFAULT_EMBEDDER_NAME:
            hint = f" (serve with VELO_EMBEDDER={args.embedder})"
        print(f"embedder ready at {path}{hint}")
        status = 0
    if status or args.no_verifier:
        return status
    for name in _verifiers_to_export(args):
        status = _export_verifier(args, name)
        if status:
            return status
    return 0


def _verifiers_to_export(args: argparse.Namespace) -> list[str]:
    """--verifier's, else the default verifier and, beside all-MiniLM-L6-v2 (either build), the English one
    (faster, English only; VELO_VERIFIER=pair-verifier picks it)."""
    if args.verifier:
        return [args.verifier]
    if args.embedder == E5_EMBEDDER or args.verifier_out:
        return [DEFAULT_VERIFIER_NAME]
    return [DEFAULT_VERIFIER_NAME, ENGLISH_VERIFIER_NAME]


def _export_verifier(args: argparse.Namespace, name: str) -> int:
    """The pair verifier ``name``, into --verifier-out, beside --out, or where the settings look for it."""
    from velo_proxy.model_export import ExportError

    configured = Settings()
    if args.verifier_out:
        out = Path(args.verifier_out)
    elif args.out:  # beside the embedder it serves (the image bakes /opt/velo/models/<name> for each)
        out = Path(args.out).parent / name
    elif name == configured.verifier:  # VELO_VERIFIER_DIR names this verifier's directory
        out = configured.verifier_dir
    else:  # never the configured verifier's directory: that holds another model
        out = default_home() / "models" / name
    try:
        if name == E5_VERIFIER_NAME:
            from velo_proxy.e5_verifier_export import export_e5_verifier

            path = export_e5_verifier(out, precision=args.verifier_precision, force=args.force)
        else:
            from velo_proxy.verifier_export import export_verifier

            path = export_verifier(out, precision=args.verifier_precision, force=args.force)
    except ExportError as exc:
        print(f"velo-proxy: pair verifier not exported: {exc}", file=sys.stderr)
        return 1
    # what serving needs to load it: nothing when it is the default verifier in its place
    if args.verifier_out or args.out:
        hint = f" (serve with VELO_VERIFIER_DIR={path})"
    elif name == ENGLISH_VERIFIER_NAME:
        hint = " (loaded with VELO_VERIFIER=pair-verifier)"
    else:
        hint = "" if name == DEFAULT_VERIFIER_NAME else f" (serve with VELO_VERIFIER={name})"
    print(f"pair verifier ready at {path}{hint}")
    return 0


def _export_e5(args: argparse.Namespace) -> int:
    from velo_proxy.e5_export import DEFAULT_PRECISION, export_e5
    from velo_proxy.model_export import ExportError

    out = Path(args.out) if args.out else default_home() / "models" / E5_EMBEDDER
    try:
        path = export_e5(out, precision=args.precision or DEFAULT_PRECISION, force=args.force)
    except ExportError as exc:
        print(f"velo-proxy: {E5_EMBEDDER} not exported: {exc}", file=sys.stderr)
        return 1
    hint = f"VELO_EMBEDDER={E5_EMBEDDER}" if not args.out else f"VELO_EMBEDDER_DIR={path}"
    print(f"embedder ready at {path} (serve with {hint})")
    return 0


def cmd_retrain(args: argparse.Namespace) -> int:
    try:
        from policy.retrain import main as retrain_main
    except ImportError as exc:  # torch lives in the 'train' extra
        print(f"velo-proxy retrain needs the training extra (pip install 'velo-proxy[train]'): {exc}", file=sys.stderr)
        return 2
    return retrain_main(args.retrain_args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="velo-proxy", description="Semantic-cache proxy for OpenAI-compatible chat APIs.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="Run the proxy.")
    _add_settings_flags(serve)
    serve.set_defaults(func=cmd_serve)

    models = commands.add_parser("models", help="Manage the bundled models.")
    model_commands = models.add_subparsers(dest="models_command", required=True)
    export = model_commands.add_parser(
        "export", help="Export the embedder (all-MiniLM-L6-v2, or its int8 quantisation with --embedder "
        f"{MINILM_INT8_EMBEDDER_NAME}) and the pair verifier to ONNX (needs the 'export' extra), "
        f"or, with --embedder {E5_EMBEDDER}, the multilingual embedder and verifier (needs the 'multilingual' extra).")
    export.add_argument("--embedder", choices=(DEFAULT_EMBEDDER_NAME, MINILM_INT8_EMBEDDER_NAME, E5_EMBEDDER),
                        default=DEFAULT_EMBEDDER_NAME,
                        help=f"Which embedder [default: {DEFAULT_EMBEDDER_NAME}].")
    export.add_argument("--out", default=None, help="Target directory [default: VELO_EMBEDDER_DIR for the configured "
                        "embedder (VELO_EMBEDDER), else <data home>/models/<embedder>].")
    export.add_argument("--precision", choices=("q4", "int8", "fp32"), default=None,
                        help=f"{E5_EMBEDDER} weights: q4 (the package's 4-bit weights as they are), int8 or fp32 "
                        "[default: q4].")
    export.add_argument("--force", action="store_true", help="Export again even if a complete model is there.")
    export.add_argument("--verifier", choices=(ENGLISH_VERIFIER_NAME, E5_VERIFIER_NAME), default=None,
                        help=f"Which pair verifier [default: {DEFAULT_VERIFIER_NAME} (it needs the 'multilingual' "
                        f"extra), and beside all-MiniLM-L6-v2 also {ENGLISH_VERIFIER_NAME}, the learned policy's].")
    export.add_argument("--verifier-out", default=None, help="Pair verifier directory [default: <parent of --out>/"
                        "<verifier> when --out is given, else VELO_VERIFIER_DIR or <data home>/models/<verifier>].")
    export.add_argument("--verifier-precision", choices=("int8", "fp32"), default=None,
                        help="Pair verifier precision [default: the one its model card chose].")
    export.add_argument("--no-verifier", action="store_true", help="Export the embedder only.")
    export.set_defaults(func=cmd_models_export)

    retrain = commands.add_parser("retrain", help="Retrain the policy from the experience streams and publish it if better "
                                  "(needs the 'train' extra; `velo-proxy retrain --help`).", add_help=False)
    retrain.add_argument("retrain_args", nargs=argparse.REMAINDER)
    retrain.set_defaults(func=cmd_retrain)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["retrain"]:  # its own parser (policy.retrain), so its flags pass through untouched
        return cmd_retrain(argparse.Namespace(retrain_args=argv[1:]))
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ValidationError as exc:
        print(f"velo-proxy: invalid configuration:\n{exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
