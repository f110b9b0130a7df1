#!/bin/sh
# Remove what deploy/install.sh installed: stops and disables every inspector@ instance, removes
# the unit, the venv and the bundles under PREFIX. Camera configs, the engine cache, recordings
# and the service user stay unless --purge is given; --purge also clears the failed state of the
# instances (systemctl reset-failed). Drop-ins in UNITDIR/inspector@.service.d/ are yours
# (install.sh writes none): they are left in place, even with --purge.
#
#   deploy/uninstall.sh [--purge]
#
# Takes the same DESTDIR, PREFIX, CONFDIR, STATEDIR, UNITDIR and SERVICE_USER as install.sh; with
# DESTDIR only files inside it are removed (no systemctl, no userdel). It refuses to remove "/",
# a top-level or a system folder (/opt, /etc/, /usr/local, /var/lib, ...), however spelt.
set -eu

PURGE=0
for arg in "$@"; do
    case "$arg" in
        --purge) PURGE=1 ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) printf 'uninstall: error: unknown argument %s\n' "$arg" >&2; exit 2 ;;
    esac
done
DESTDIR=${DESTDIR:-}
PREFIX=${PREFIX:-/opt/inspector}
CONFDIR=${CONFDIR:-/etc/inspector}
STATEDIR=${STATEDIR:-/var/lib/inspector}
UNITDIR=${UNITDIR:-/etc/systemd/system}
SERVICE_USER=${SERVICE_USER:-inspector}
ROOT=${DESTDIR%/}

say() { printf 'uninstall: %s\n' "$*"; }
refuse() { printf 'uninstall: error: refusing to remove %s\n' "$*" >&2; exit 2; }

# normpath, system_dir, check_install_dirs
. "$(dirname "$0")/paths.sh"
# Refuse to remove "/" or a system folder by a typo in PREFIX and friends: PREFIX=/opt/ or
# CONFDIR=/etc/inspector/.. must not pass for anything else than /opt and /etc.
check_install_dirs refuse

if [ -z "$ROOT" ] && command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    for unit in $(systemctl list-units --all --plain --no-legend 'inspector@*' | awk '{print $1}'); do
        say "stopping $unit"
        systemctl stop "$unit" || true
    done
    for link in /etc/systemd/system/*.wants/inspector@*.service; do
        [ -e "$link" ] || [ -L "$link" ] || continue
        systemctl disable "$(basename "$link")" || true
    done
fi

rm -f "$ROOT$UNITDIR/inspector@.service"
rm -rf "$ROOT$PREFIX"
rm -f "$ROOT/usr/lib/tmpfiles.d/inspector.conf"
say "removed $UNITDIR/inspector@.service and $PREFIX"

if [ "$PURGE" = 1 ]; then
    rm -rf "$ROOT$CONFDIR" "$ROOT$STATEDIR"
    rm -f "$ROOT/usr/lib/sysusers.d/inspector.conf"
    if [ -z "$ROOT" ] && id "$SERVICE_USER" >/dev/null 2>&1; then
        userdel "$SERVICE_USER" || true
    fi
    say "purged $CONFDIR, $STATEDIR and the $SERVICE_USER user"
else
    say "kept $CONFDIR, $STATEDIR and the $SERVICE_USER user (--purge removes them)"
fi
if [ -d "$ROOT$UNITDIR/inspector@.service.d" ]; then
    say "kept $UNITDIR/inspector@.service.d: its drop-ins are not install.sh's (remove it yourself)"
fi

if [ -z "$ROOT" ] && command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    if [ "$PURGE" = 1 ]; then
        # failed instances stay listed (systemctl --failed) after their unit is gone
        systemctl reset-failed 'inspector@*' >/dev/null 2>&1 || true
    fi
fi
