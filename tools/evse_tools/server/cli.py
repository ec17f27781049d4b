"""``evse-server``: the installer's command line for load groups, and the MQTT service.

Examples::

    evse-server group create garage --breaker 50          # limit 40 A (80 %, NEC 625.41)
    evse-server member add garage bay-1 --rating 40
    evse-server group show garage
    evse-server run --broker localhost:1883
    evse-server broker-setup --dir broker --host broker.lan     # CA, TLS, accounts, ACL
    evse-server run --broker broker.lan:8883 --cafile broker/ca.pem \\
        --username evse_server --password-file broker/passwords/evse_server

The database is ``--db PATH``, else ``$EVSE_SERVER_DB``, else ``evse-server.db`` in
the current directory. Refused operations print ``error: ...`` on stderr and exit
with status 1; malformed arguments exit with argparse's status 2.
"""
import argparse
import math
import os
import sqlite3
import sys

from evse_tools.server import secure
from evse_tools.server.db import GroupStore, StoreError, max_limit

DEFAULT_DB = "evse-server.db"


class _Parser(argparse.ArgumentParser):
    """argparse without prefix abbreviations (``--d`` must not mean ``--db``)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


def _broker(text):
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = text, "1883"
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError("expected HOST:PORT, got %r" % text)
    return host, int(port)


def _limit_arg(text):
    """A group limit from the command line: a number of amperes. Whole
    numbers become int; any other number goes to the store as it is, which
    explains why it is refused (0.1..5.9 A: below the 6 A minimum)."""
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("%r is not a number of amperes" % text) from None
    if not math.isfinite(x):
        raise argparse.ArgumentTypeError("%r is not a number of amperes" % text)
    return int(x) if x == int(x) else x


def build_parser():
    p = _Parser(prog="evse-server", description="Load-group server for load-sharing EV chargers.")
    p.add_argument("--db", default=os.environ.get("EVSE_SERVER_DB") or DEFAULT_DB,
                   help="SQLite database (default: $EVSE_SERVER_DB or ./%s)" % DEFAULT_DB)
    top = p.add_subparsers(dest="area", required=True, metavar="{group,member,ota,run,broker-setup}",
                           parser_class=_Parser)

    group = top.add_parser("group", help="create, list, show, change and delete load groups")
    g = group.add_subparsers(dest="action", required=True, parser_class=_Parser)
    c = g.add_parser("create", help="create a group; the limit defaults to the seed chart")
    c.add_argument("name")
    c.add_argument("--breaker", type=int, required=True, metavar="A", help="breaker rating, A")
    c.add_argument("--limit", type=_limit_arg, metavar="A",
                   help="group limit, A (default: 20->16, 30->24, 40->32, 50->40, 100->75, "
                        "else 80 %% of the breaker; 0 pauses every member)")
    c.add_argument("--fair-offline", action="store_true",
                   help="offline current floor(limit / members) instead of 8 A")
    c.add_argument("--t-wd", type=int, default=30, metavar="S",
                   help="connectivity-watchdog timeout, s (10..600, default 30)")
    g.add_parser("list", help="list groups")
    for name, text in (("show", "show a group and its members"),
                       ("delete", "delete a group and its members")):
        g.add_parser(name, help=text).add_argument("name")
    b = g.add_parser("set-breaker", help="change the breaker; the limit follows the chart")
    b.add_argument("name")
    b.add_argument("breaker", type=int, metavar="A")
    b.add_argument("--limit", type=_limit_arg, metavar="A",
                   help="group limit, A (default: chart; 0 pauses every member)")
    lim = g.add_parser("set-limit", help="change the group limit (at most 80 %% of the breaker; "
                                         "0 pauses every member)")
    lim.add_argument("name")
    lim.add_argument("limit", type=_limit_arg, metavar="A")
    f = g.add_parser("set-fair-offline", help="turn the fair offline fallback on or off")
    f.add_argument("name")
    f.add_argument("state", choices=("on", "off"))

    member = top.add_parser("member", help="add and remove chargers")
    m = member.add_subparsers(dest="action", required=True, parser_class=_Parser)
    a = m.add_parser("add", help="add a charger to a group")
    a.add_argument("group")
    a.add_argument("id")
    a.add_argument("--rating", type=float, required=True, metavar="A",
                   help="the charger's unit rating, A (6..80)")
    m.add_parser("remove", help="remove a charger from its group").add_argument("id")

    o = top.add_parser("ota", help="push a signed update to a charger and follow it")
    o.add_argument("member", help="charger id")
    o.add_argument("--bundle", required=True, help="bundle directory from `evse-ota build`")
    o.add_argument("--pubkey", help="ota_key.json to check the bundle against first")
    o.add_argument("--broker", type=_broker, default=("localhost", 1883), metavar="HOST:PORT")
    o.add_argument("--prefix", default="evse")
    o.add_argument("--http-host", default="127.0.0.1",
                   help="address the charger downloads from (default 127.0.0.1)")
    o.add_argument("--http-port", type=int, default=0, help="HTTP port (default: any free one)")
    o.add_argument("--timeout", type=float, default=600.0, metavar="S",
                   help="how long to wait for the new version, s (default 600)")
    secure.add_broker_auth_arguments(o)

    bs = top.add_parser("broker-setup",
                        help="make the CA, the broker's TLS certificate, one account per charger "
                             "and the ACL (mosquitto)")
    bs.add_argument("--dir", required=True,
                    help="where the files go (created with mode 0700, or 0750 with a broker group)")
    bs.add_argument("--host", action="append", required=True, metavar="NAME",
                    help="a DNS name or IP address the chargers use for the broker (repeatable)")
    bs.add_argument("--port", type=int, default=8883, help="TLS listener port (default 8883)")
    bs.add_argument("--prefix", default="evse", help="charger topic prefix (default evse)")
    bs.add_argument("--rotate", action="append", default=[], metavar="USER",
                    help="renew this account's password (repeatable)")
    bs.add_argument("--broker-group", metavar="GROUP",
                    help="group that may read the broker's files (default: mosquitto when run "
                         "as root and it exists, as a packaged mosquitto drops to that user; "
                         "'none': nobody but you)")

    r = top.add_parser("run", help="run the MQTT load-group service")
    r.add_argument("--broker", type=_broker, default=("localhost", 1883), metavar="HOST:PORT",
                   help="MQTT broker (default localhost:1883)")
    r.add_argument("--prefix", default="evse", help="charger topic prefix (default evse)")
    secure.add_broker_auth_arguments(r)
    r.add_argument("--group", action="append", metavar="NAME",
                   help="serve only this group (repeatable; default: all)")
    r.add_argument("--rotate-s", type=float, default=300.0, metavar="S",
                   help="in a shortage, shortest time a pause rotation holds, s (default 300)")
    return p


def _num(x):
    if x is None:
        return "-"
    return "%d" % x if float(x).is_integer() else "%g" % x     # epochs are ~1.8e9: whole


def _table(rows, out):
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        out.write("  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip() + "\n")


def _show_list(store, out):
    groups = store.list_groups()
    if not groups:
        out.write("no groups\n")
        return
    rows = [("NAME", "BREAKER", "LIMIT", "MEMBERS", "OFFLINE", "T_WD")]
    for gr in groups:
        rows.append((gr.name, "%d A" % gr.breaker_a,
                     "0 A (paused)" if gr.limit_a == 0 else "%d A" % gr.limit_a, str(len(gr.members)),
                     "fair" if gr.fair_offline else "8 A", "%d s" % gr.t_wd_s))
    _table(rows, out)


def _show_group(gr, out):
    out.write("group %s\n" % gr.name)
    out.write("  breaker   %d A\n" % gr.breaker_a)
    if gr.limit_a == 0:
        out.write("  limit     0 A: PAUSED, no member charges, offline and start currents 0 "
                  "(max %d A: 80 %% of the breaker, NEC 625.41)\n" % max_limit(gr.breaker_a))
    else:
        out.write("  limit     %d A (max %d A: 80 %% of the breaker, NEC 625.41)\n"
                  % (gr.limit_a, max_limit(gr.breaker_a)))
    out.write("  offline   %s\n" % ("fair: floor(limit / members), capped at the unit rating"
                                    if gr.fair_offline else "8 A per member (seed default)"))
    out.write("  watchdog  %d s\n" % gr.t_wd_s)
    if not gr.members:
        out.write("  no members\n")
        return
    out.write("members:\n")
    rows = [("ID", "RATING A", "OFFLINE A", "START A", "SETPOINT A", "SEQ", "EPOCH")]
    for mb in gr.members:
        rows.append((mb.id, _num(mb.unit_rating_a), _num(mb.offline_a), _num(mb.start_a),
                     _num(mb.last_setpoint_a), _num(mb.last_seq), _num(mb.last_epoch)))
    _table(rows, out)


def _broker_setup(args, store, out):
    from pathlib import Path

    if not 1 <= args.port <= 65535:
        raise StoreError("--port must be 1..65535")
    ids = [mb.id for gr in store.list_groups() for mb in gr.members]
    directory = Path(args.dir)
    group = args.broker_group
    if group is None:
        group = secure.default_broker_group()
    elif group == "none":
        group = None
    try:
        rep = secure.setup(directory, args.host, ids, args.prefix, args.port, args.rotate, group)
    except (secure.SetupError, OSError) as exc:
        raise StoreError(str(exc)) from exc
    d = directory
    out.write("CA            %s %s\n" % ("created" if rep.created_ca else "kept", d / "ca.pem"))
    out.write("broker cert   %s %s for %s\n" % ("issued" if rep.issued_broker_cert else "kept",
                                                 d / "broker.pem", ", ".join(sorted(args.host))))
    out.write("accounts      %d (%s, %s and %d charger(s))\n" % (
        len(rep.accounts), secure.SERVER_USER, secure.ADMIN_USER, len(rep.accounts) - 2))
    for what, names in (("added", rep.added), ("removed", rep.removed), ("rotated", rep.rotated)):
        if names:
            out.write("  %-11s %s\n" % (what, ", ".join(names)))
    out.write("wrote         %s, %s, %s\n" % (d / "passwd", d / "acl", d / "mosquitto.conf"))
    if group:
        out.write("readable by   group %s: %s (never ca.key or passwords/)\n"
                  % (group, ", ".join(secure.BROKER_FILES)))
    host = sorted(args.host)[0]
    out.write("next:\n")
    out.write("  broker   mosquitto -c %s   (running already: kill -HUP it to reload "
              "the accounts and the ACL)\n" % (d / "mosquitto.conf"))
    out.write("  server   evse-server run --broker %s:%d --cafile %s --username %s "
              "--password-file %s\n" % (host, args.port, d / "ca.pem", secure.SERVER_USER,
                                         d / "passwords" / secure.SERVER_USER))
    out.write("  ota      evse-server ota ID --bundle DIR --broker %s:%d --cafile %s --username %s "
              "--password-file %s\n" % (host, args.port, d / "ca.pem", secure.ADMIN_USER,
                                         d / "passwords" / secure.ADMIN_USER))
    out.write("  charger  evse-deploy provision --id ID --broker mqtts://%s:%d --mqtt-user ID "
              "--mqtt-password-file %s --ca %s\n" % (host, args.port, d / "passwords" / "ID",
                                                      d / "ca.pem"))
    return 0


def _dispatch(args, store, out):
    if args.area == "ota":
        from pathlib import Path

        from evse_tools.server import otapush
        bundle = Path(args.bundle)
        if not (bundle / "manifest.json").is_file():
            raise StoreError("no bundle at %s (expected manifest.json)" % bundle)
        if store.group_of(args.member) is None:
            raise StoreError("unknown charger %r" % args.member)
        try:
            return otapush.push(bundle, args.member, args.broker, args.prefix, args.http_host,
                                args.http_port, Path(args.pubkey) if args.pubkey else None,
                                args.timeout, out=lambda s: out.write(s + "\n") or out.flush(),
                                configure=lambda c: secure.configure_client(c, args))
        except secure.SetupError as exc:
            raise StoreError(str(exc)) from exc
        except ValueError as exc:
            raise StoreError("bundle refused: %s" % exc) from exc
    if args.area == "broker-setup":
        return _broker_setup(args, store, out)
    if args.area == "run":
        try:
            from evse_tools.server import service
        except ImportError as exc:
            raise StoreError("the MQTT service cannot be loaded: %s" % exc) from exc
        return service.run(store, args)
    if args.area == "member":
        if args.action == "add":
            mb = store.add_member(args.group, args.id, args.rating)
            out.write("added charger %s (%g A) to group %s\n" % (mb.id, mb.unit_rating_a, mb.group))
        else:
            store.remove_member(args.id)
            out.write("removed charger %s\n" % args.id)
        return 0
    act = args.action
    if act == "list":
        _show_list(store, out)
    elif act == "show":
        _show_group(store.get_group(args.name), out)
    elif act == "create":
        gr = store.create_group(args.name, args.breaker, args.limit, args.fair_offline, args.t_wd)
        out.write("created group %s: breaker %d A, limit %d A\n" % (gr.name, gr.breaker_a, gr.limit_a))
    elif act == "delete":
        n = len(store.get_group(args.name).members)
        store.delete_group(args.name)
        out.write("deleted group %s and its %d member(s)\n" % (args.name, n))
    elif act == "set-breaker":
        gr = store.set_breaker(args.name, args.breaker, args.limit)
        out.write("group %s: breaker %d A, limit %d A\n" % (gr.name, gr.breaker_a, gr.limit_a))
    elif act == "set-limit":
        gr = store.set_limit(args.name, args.limit)
        out.write("group %s: limit %d A%s\n" % (gr.name, gr.limit_a, ": every member paused"
                                                  if gr.limit_a == 0 else ""))
    elif act == "set-fair-offline":
        gr = store.set_fair_offline(args.name, args.state == "on")
        out.write("group %s: fair offline %s\n" % (gr.name, "on" if gr.fair_offline else "off"))
    return 0


def main(argv=None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 refused, 2 bad arguments)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or malformed arguments (2)
        return exc.code if isinstance(exc.code, int) else 2
    try:
        store = GroupStore(args.db)
    except (sqlite3.Error, OSError, StoreError) as exc:
        print("error: cannot open the database %s: %s" % (args.db, exc), file=sys.stderr)
        return 1
    try:
        return _dispatch(args, store, sys.stdout)
    except StoreError as exc:
        print("error: %s" % exc, file=sys.stderr)
        return 1
    except sqlite3.Error as exc:
        print("error: database %s: %s" % (args.db, exc), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        store.close()


if __name__ == "__main__":
    sys.exit(main())
