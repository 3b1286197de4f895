"""``medhotline surge on|off|status|check`` and ``medhotline callbacks list``.

``surge on`` validates the profile and the entry flow made from it (with the flows in ``hotline.flows_dir``, like
any flow), checks that the audit log would accept the entry, and then stores the switch; every node picks it up
within ``hotline.surge_poll`` seconds. ``surge off`` restores exactly what was in force before. Both are audited
with who (the OS user, or ``--as``) and why (``--reason``).
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from ground import db
from ground.errors import CommandError
from ground.operator import actor_id
from ivr.flow_registry import FlowRegistry
from routing.callback_store import CallbackStore, ModeStore
from routing.surge import SURGE_FLOW, SurgeError, entry_flow_yaml, load_profile
from routing.surge_switch import SurgeSwitch

if TYPE_CHECKING:
    from ground.config import Config
    from routing.surge import SurgeProfile

PROFILES_DIR = "surge_profiles"


def _error(message: str) -> Exception:

    return CommandError(message)


def resolve_profile(config: Config, given: str) -> Path:
    """A file path, or a profile name looked up as ``<flows_dir>/surge_profiles/<name>.yaml``."""
    path = Path(given)
    if path.suffix in (".yaml", ".yml") or "/" in given:
        return path
    return config.hotline.flows_dir / PROFILES_DIR / f"{given}.yaml"


def checked_profile(config: Config, given: str) -> tuple[SurgeProfile, str, str]:
    """(profile, its text, the entry flow's YAML), validated with the flows; CommandError lists every problem."""

    path = resolve_profile(config, given)
    try:
        profile, text = load_profile(path)
    except SurgeError as exc:
        raise _error(str(exc)) from None
    entry = entry_flow_yaml(profile)
    registry = FlowRegistry(config.hotline.flows_dir)
    registry.refresh()
    problems = registry.set_overlay({SURGE_FLOW: entry})
    if problems:
        listed = "\n  ".join(str(p) for p in problems)
        raise _error(f"surge profile {path}: its entry flow is not valid with the flows in "
                     f"{config.hotline.flows_dir}:\n  {listed}")  # fmt: skip
    return profile, text, entry


def _actor(args: argparse.Namespace) -> str:

    # One audit identity for the operator at the shell, whichever command they run (ground.operator).
    return actor_id(args.actor)


def _surge_on(config: Config, args: argparse.Namespace) -> int:

    profile, text, entry = checked_profile(config, args.profile)
    with db.current_engine(config.database_url) as engine:
        record = SurgeSwitch.for_engine(engine).on(profile, text, entry, actor=_actor(args), reason=args.reason,
                                                   at=datetime.now(UTC))  # fmt: skip
    print(f"surge mode ON (profile {profile.name}, switch #{record.id}); new calls hear the bulletin within "
          f"{config.hotline.reload_interval:g} s on every node")  # fmt: skip
    return 0


def _surge_off(config: Config, args: argparse.Namespace) -> int:

    with db.current_engine(config.database_url) as engine:
        record = SurgeSwitch.for_engine(engine).off(actor=_actor(args), reason=args.reason, at=datetime.now(UTC))
    print(f"surge mode OFF (switch #{record.id}): the hotline is back to {record.mode}")
    return 0


def _surge_status(config: Config, args: argparse.Namespace) -> int:

    with db.current_engine(config.database_url) as engine:
        current = ModeStore.for_engine(engine).current()
    if current is None:
        print("normal (as configured; surge mode was never switched on)")
        return 0
    what = f"surge, profile {current.profile_name}" if current.surge else "normal"
    print(f"{what}; since {current.at:%Y-%m-%d %H:%M:%S} UTC by {current.actor}: {current.reason}")
    return 0


def _surge_check(config: Config, args: argparse.Namespace) -> int:
    profile, _, _ = checked_profile(config, args.profile)
    limits = ", ".join(f"{c} {n}" for c, n in profile.capacity.items()) or "none"
    print(f"ok: profile {profile.name}; symptoms → {profile.symptoms.category}; information → {profile.faq_flow}; "
          f"volunteers take {', '.join(profile.volunteer_categories)}; capacity: {limits}; overflow: "
          f"{profile.overflow}")  # fmt: skip
    return 0


def _callbacks_list(config: Config, args: argparse.Namespace) -> int:

    with db.current_engine(config.database_url) as engine:
        rows = CallbackStore.for_engine(engine).listing(open_only=not args.all)
    for row in rows:
        when = f"{row.requested_at:%Y-%m-%d %H:%M:%S}"
        print(f"{row.id}  {when}  {row.category:<16} {row.priority:<9} {row.state:<9} attempts {row.attempts}  "
              f"{row.last_outcome or '-'}  task {row.task_id or '-'}")  # fmt: skip
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    surge = sub.add_parser("surge", help="public-health surge mode: on, off, status, check a profile")
    actions = surge.add_subparsers(dest="surge_action", required=True, metavar="ACTION")
    on = actions.add_parser("on", help="switch the hotline to a surge profile (audited)")
    on.add_argument("--profile", required=True, metavar="FILE|NAME", help="profile YAML or a name in surge_profiles/")
    on.add_argument("--reason", required=True, help="why (kept with the switch and in the audit trail)")
    on.add_argument("--as", dest="actor", help="who switches (default: the OS user)")
    on.set_defaults(func=_surge_on)
    off = actions.add_parser("off", help="restore the configuration in force before the surge (audited)")
    off.add_argument("--reason", required=True)
    off.add_argument("--as", dest="actor")
    off.set_defaults(func=_surge_off)
    status = actions.add_parser("status", help="the mode in force, since when, by whom, why")
    status.set_defaults(func=_surge_status)
    check = actions.add_parser("check", help="validate a profile and its entry flow without switching")
    check.add_argument("--profile", required=True, metavar="FILE|NAME")
    check.set_defaults(func=_surge_check)

    callbacks = sub.add_parser("callbacks", help="callbacks requested by waiting callers")
    cb_actions = callbacks.add_subparsers(dest="callbacks_action", required=True, metavar="ACTION")
    listing = cb_actions.add_parser("list", help="open callbacks (numbers are never shown)")
    listing.add_argument("--all", action="store_true", help="also connected, failed and cancelled ones")
    listing.set_defaults(func=_callbacks_list)
