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

# The lexical form of an absolute path: no trailing or doubled slashes, no . or .. (nothing has
# to exist, symbolic links are not followed: with DESTDIR they would be the wrong system's).
normpath() (
    set -f
    IFS=/
    out=
    for c in $1; do
        case "$c" in
            ''|.) ;;
            ..) out=${out%/*} ;;
            *) out=$out/$c ;;
        esac
    done
    printf '%s\n' "${out:-/}"
)
# "/", a top-level folder or a system one, as a typo in PREFIX and friends makes it (the same list
# as install.sh's: keep in step)
system_dir() {
    case "$1" in
        /*/*) ;;
        *) return 0 ;;  # "/" and the top level: /opt, /etc, /usr, /var, /srv, /home, ...
    esac
    case "$1" in
        /usr/*/*|/var/*/*|/home/*/*|/run/*/*) ;;
        /usr/*|/var/*|/home/*|/run/*) return 0 ;;  # /usr/local, /var/lib, a home, /run/user, ...
    esac
    case "$1" in
        /etc/systemd|/etc/systemd/system|/etc/default|/etc/opt|/etc/ssl|/etc/ssh|/etc/pam.d \
        |/etc/security|/etc/profile.d|/etc/sudoers.d|/etc/cron.d|/etc/apt|/etc/X11|/etc/alternatives \
        |/usr/local/bin|/usr/local/etc|/usr/local/include|/usr/local/lib|/usr/local/lib64 \
        |/usr/local/libexec|/usr/local/sbin|/usr/local/share|/usr/local/src \
        |/usr/lib/systemd|/usr/lib/sysusers.d|/usr/lib/tmpfiles.d|/usr/share/doc \
        |/var/lib/systemd|/var/lib/dpkg|/var/lib/apt|/var/lib/rpm|/var/lib/private) return 0 ;;
    esac
    return 1
}
# Refuse to remove "/" or a system folder by a typo in PREFIX and friends: PREFIX=/opt/ or
# CONFDIR=/etc/inspector/.. must not pass for anything else than /opt and /etc.
for v in "PREFIX=$PREFIX" "CONFDIR=$CONFDIR" "STATEDIR=$STATEDIR" "UNITDIR=$UNITDIR"; do
    case "${v#*=}" in
        /*) ;;
        *) refuse "$v: not an absolute path" ;;
    esac
done
PREFIX=$(normpath "$PREFIX")
CONFDIR=$(normpath "$CONFDIR")
STATEDIR=$(normpath "$STATEDIR")
UNITDIR=$(normpath "$UNITDIR")
for v in "PREFIX=$PREFIX" "CONFDIR=$CONFDIR" "STATEDIR=$STATEDIR"; do
    ! system_dir "${v#*=}" || refuse "$v: a top-level or system folder"
done

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
