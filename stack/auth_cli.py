"""``credit-risk auth``: provision the tracking server's identities, write credentials for
Kubernetes Secrets, print the permission table.

``stack.cli`` adds it with ``auth_cli.add_parser(subparsers)``. This module imports nothing
heavy: ``stack.auth`` (MLflow, the training package) is imported when a command runs.

Exit codes: 0 done (or nothing to change); 1 refused or failed, one ``error:`` line.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from stack.auth_files import AUTH_CONFIG_FILE, SECRET_KEY_FILE, CredentialsError
from stack.services import DEFAULT_STATE_DIR, MLFLOW_PORT, tracking_uri

DEFAULT_CREDENTIALS_DIR = DEFAULT_STATE_DIR / "auth"


def _provision(args) -> int:
    from stack.auth import ProvisioningError, names_from_environment, provision

    tracking = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or tracking_uri(MLFLOW_PORT)
    try:
        report = provision(
            tracking,
            Path(args.credentials_dir),
            names_from_environment(),
            per_identity_folders=args.per_identity_folders,
        )
    except (ProvisioningError, CredentialsError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for line in report.changes:
        print(f"changed: {line}")
    for line in report.notes:
        print(f"note: {line}")
    if not report.changed:
        print(f"auth on {tracking}: nothing to change")
    return 0


def _credentials(args) -> int:
    from stack.auth import write_credentials

    try:
        paths = write_credentials(Path(args.credentials_dir), per_identity_folders=args.per_identity_folders)
    except CredentialsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    return 0


def _table(args) -> int:
    from stack.auth import names_from_environment
    from stack.auth_policy import markdown_table

    print(markdown_table(names_from_environment()))
    return 0


def add_parser(subparsers) -> None:
    text = "identities and permissions on the tracking server (MLflow basic-auth)"
    parser = subparsers.add_parser("auth", help=text, description=text)
    commands = parser.add_subparsers(dest="auth_command", required=True)
    directory_help = f"where the credentials files are (default {DEFAULT_CREDENTIALS_DIR})"
    folders_help = (
        "<identity>/<identity>.env instead of <identity>.env (admin's stays at the top), one folder "
        "per volume or Secret, mounted into that identity's containers only"
    )

    provision_parser = commands.add_parser(
        "provision", help="create identities and apply exactly their grants, as admin (idempotent)"
    )
    provision_parser.add_argument(
        "--tracking-uri", help="default $MLFLOW_TRACKING_URI, else the local server"
    )
    provision_parser.add_argument(
        "--credentials-dir", default=str(DEFAULT_CREDENTIALS_DIR), help=directory_help
    )
    provision_parser.add_argument("--per-identity-folders", action="store_true", help=folders_help)
    provision_parser.set_defaults(handler=_provision)

    credentials_parser = commands.add_parser(
        "credentials",
        help=f"write every identity's <identity>.env and {SECRET_KEY_FILE}, keeping existing ones "
        f"(for Kubernetes Secrets; {AUTH_CONFIG_FILE} is written by the tracking server's launcher)",
    )
    credentials_parser.add_argument("--credentials-dir", required=True, help="folder to write them to")
    credentials_parser.add_argument("--per-identity-folders", action="store_true", help=folders_help)
    credentials_parser.set_defaults(handler=_credentials)

    table_parser = commands.add_parser("table", help="print the permission table (Markdown)")
    table_parser.set_defaults(handler=_table)


def main(argv: list[str] | None = None) -> int:
    """``python -m stack.auth_cli ...``: the same commands before ``stack.cli`` adds them."""
    parser = argparse.ArgumentParser(prog="credit-risk")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
