#!/bin/sh
# Install the strip inspector on a line PC: a venv under /opt, the `inspector` system user, the
# systemd template unit inspector@.service and the config folder. Re-running upgrades the venv
# and the unit and never touches existing camera configs.
#
#   deploy/install.sh [SOURCE]
#
# SOURCE  a wheel (strip_inspector-*.whl) or a source tree; default: the tree this script is in.
#
# Environment (defaults in brackets):
#   DESTDIR       install into this scratch root instead of /: nothing outside it is touched (no
#                 user is created, no chown, no systemctl); the tree is ready to be packaged or
#                 copied to / (venv scripts already point at PREFIX, not DESTDIR/PREFIX)
#   PREFIX        [/opt/inspector]       venv in PREFIX/venv, model bundles in PREFIX/models
#   CONFDIR       [/etc/inspector]       camera configs: CONFDIR/cameras/<instance>.yaml
#   STATEDIR      [/var/lib/inspector]   engine cache and recordings (writable by the service;
#                                        under /var/lib the unit's StateDirectory=, elsewhere its
#                                        ReadWritePaths=; not under /home, /root, /tmp: the unit
#                                        hides those)
#   UNITDIR       [/etc/systemd/system]
#   SERVICE_USER  [inspector]
#   SUPPLEMENTARY_GROUPS  [video render]  device groups of the service; only those that exist
#                 (getent group; with DESTDIR, DESTDIR/etc/group where there is one) go into the
#                 unit, since a missing group fails its start (216/GROUP)
#   PYTHON        [python3.11, else python3]
#   EXTRAS        [plc]                  pip extras ("" for none, "plc,gpu" with TensorRT, pycuda
#                                        and onnxruntime-gpu, "plc,ort-gpu" onnxruntime-gpu alone);
#                                        with either GPU extra the CPU onnxruntime is replaced
#   MODELS        [<script dir>/models]  bundles copied to PREFIX/models
#   WHEELHOUSE    a folder of wheels: install offline from it (pip --no-index --find-links)
#   PIP_ARGS      more pip arguments, e.g. "--no-deps"
#
# Network: installing from the index needs it. For an offline line PC build on a connected
# machine of the same OS/Python:
#   pip wheel --no-deps -w dist .                  # the inspector wheel
#   pip wheel -w wheelhouse 'dist/strip_inspector-*.whl[plc]'   # it and all dependencies
# and run:  WHEELHOUSE=wheelhouse deploy/install.sh dist/strip_inspector-*.whl
set -eu

HERE=$(cd "$(dirname "$0")" && pwd)
SOURCE=${1:-$(dirname "$HERE")}
DESTDIR=${DESTDIR:-}
PREFIX=${PREFIX:-/opt/inspector}
CONFDIR=${CONFDIR:-/etc/inspector}
STATEDIR=${STATEDIR:-/var/lib/inspector}
UNITDIR=${UNITDIR:-/etc/systemd/system}
SERVICE_USER=${SERVICE_USER:-inspector}
SUPPLEMENTARY_GROUPS=${SUPPLEMENTARY_GROUPS-video render}
EXTRAS=${EXTRAS-plc}
MODELS=${MODELS:-$HERE/models}
WHEELHOUSE=${WHEELHOUSE:-}
PIP_ARGS=${PIP_ARGS:-}
if [ -z "${PYTHON:-}" ]; then
    PYTHON=$(command -v python3.11 || command -v python3 || true)
fi

say() { printf 'install: %s\n' "$*"; }
die() { printf 'install: error: %s\n' "$*" >&2; exit 1; }

[ -n "$PYTHON" ] || die "no python3 found; set PYTHON"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "$PYTHON is older than Python 3.11"
case "$SOURCE" in
    *.whl) [ -f "$SOURCE" ] || die "wheel $SOURCE not found" ;;
    *) [ -f "$SOURCE/setup.cfg" ] || die "$SOURCE is neither a wheel nor the inspector source tree" ;;
esac
# the venv runs on its base Python: one under a folder the unit hides (a pyenv build in /root) makes
# a service that cannot start (203/EXEC), however its permissions are set
PYTHON_HOME=$("$PYTHON" -c 'import os, sys; print(os.path.realpath(sys.base_prefix))')
case "$PYTHON_HOME/" in
    /home/*|/root/*|/run/user/*|/tmp/*|/var/tmp/*)
        say "warning: $PYTHON lives in $PYTHON_HOME, which the unit hides (ProtectHome=yes," \
            "PrivateTmp=yes): the service will not start; install with PYTHON=/usr/bin/python3.11" \
            "(or another Python outside those folders) for a line PC" ;;
esac
case "$PREFIX$CONFDIR$STATEDIR$UNITDIR" in
    *" "*) die "paths with spaces are not supported" ;;
    # sed replacement and systemd specifier characters
    *[\\\|\&%]*) die "paths with \\, |, & or % are not supported" ;;
esac

# normpath, system_dir, check_install_dirs
. "$(dirname "$0")/paths.sh"
check_install_dirs die
case "$STATEDIR/" in
    /home/*|/root/*|/run/user/*|/tmp/*|/var/tmp/*)
        die "STATEDIR=$STATEDIR: the unit cannot write there (ProtectHome=yes, PrivateTmp=yes)" ;;
esac
case "$SUPPLEMENTARY_GROUPS" in
    *[!A-Za-z0-9._\ -]*) die "SUPPLEMENTARY_GROUPS=$SUPPLEMENTARY_GROUPS: not a list of group names" ;;
esac
ROOT=${DESTDIR%/}
if [ -n "$ROOT" ]; then
    mkdir -p "$ROOT"
    ROOT=$(cd "$ROOT" && pwd)
fi

# -- venv and package ---------------------------------------------------------------------------
VENV=$ROOT$PREFIX/venv
VENV_HINT="on Debian/Ubuntu install the venv module (apt install python3-venv, or python3.11-venv), then run this again"
if [ -x "$VENV/bin/python" ] && ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
    # what a `python3 -m venv` that failed half-way leaves (no python3-venv: ensurepip missing):
    # a venv without pip, which every later run would otherwise fail on
    say "the venv $PREFIX/venv has no pip (left by a failed creation?): creating it again"
    "$PYTHON" -m venv --clear "$VENV" || die "cannot create the venv $PREFIX/venv with $PYTHON; $VENV_HINT"
elif [ ! -x "$VENV/bin/python" ]; then
    say "creating venv $PREFIX/venv with $PYTHON"
    mkdir -p "$ROOT$PREFIX"
    "$PYTHON" -m venv "$VENV" || die "cannot create the venv $PREFIX/venv with $PYTHON; $VENV_HINT"
fi
"$VENV/bin/python" -m pip --version >/dev/null 2>&1 || die "the venv $PREFIX/venv has no pip; $VENV_HINT"
SPEC=$SOURCE
[ -n "$EXTRAS" ] && SPEC="$SOURCE[$EXTRAS]"
set -- --disable-pip-version-check --no-input
[ -n "$WHEELHOUSE" ] && set -- "$@" --no-index --find-links "$WHEELHOUSE"
say "installing $SPEC"
# PIP_ARGS is deliberately split into words
# shellcheck disable=SC2086
"$VENV/bin/python" -m pip install -q "$@" $PIP_ARGS --upgrade "$SPEC"

case ",$EXTRAS," in
    *,gpu,*|*,ort-gpu,*)
        # onnxruntime (the runtime's own requirement) and onnxruntime-gpu install the same Python
        # package; whichever pip wrote last wins, and a CPU build left in place hides the GPU
        # providers. Keep onnxruntime-gpu alone, at the version pip chose. A re-run that finds
        # no CPU build leaves the GPU one as it is (no 250 MB download per upgrade).
        ORT_GPU=$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("onnxruntime-gpu"))' \
                  2>/dev/null || true)
        if ! "$VENV/bin/python" -c 'import importlib.metadata as m; m.version("onnxruntime")' 2>/dev/null \
                && [ -n "$ORT_GPU" ]; then
            say "onnxruntime-gpu $ORT_GPU is the only onnxruntime build: kept"
        else
            say "replacing the CPU onnxruntime with onnxruntime-gpu${ORT_GPU:+ $ORT_GPU}"
            "$VENV/bin/python" -m pip uninstall -q -y onnxruntime onnxruntime-gpu >/dev/null 2>&1 || true
            # shellcheck disable=SC2086
            if ! "$VENV/bin/python" -m pip install -q "$@" $PIP_ARGS --no-deps "onnxruntime-gpu${ORT_GPU:+==$ORT_GPU}"; then
                # never leave the venv without an onnxruntime: put the CPU build back
                # shellcheck disable=SC2086
                if "$VENV/bin/python" -m pip install -q "$@" $PIP_ARGS --no-deps onnxruntime >/dev/null 2>&1; then
                    die "installing onnxruntime-gpu${ORT_GPU:+ $ORT_GPU} failed; the CPU onnxruntime is back in place"
                fi
                die "installing onnxruntime-gpu${ORT_GPU:+ $ORT_GPU} failed, and so did putting the CPU onnxruntime back: install one by hand"
            fi
        fi
        PROVIDERS=$("$VENV/bin/python" -c 'import onnxruntime as o; print(",".join(o.get_available_providers()))' \
                    2>&1) || die "onnxruntime does not import after the swap: $PROVIDERS"
        say "onnxruntime providers: $PROVIDERS"
        case "$PROVIDERS" in
            *CUDAExecutionProvider*) ;;
            *) say "warning: no CUDAExecutionProvider in this onnxruntime build" ;;
        esac
        ;;
esac

if [ -n "$ROOT" ]; then
    # A venv is not relocatable: its scripts name their interpreter by absolute path. Make them
    # name PREFIX, where the tree will live, instead of the scratch root.
    grep -rlI -- "$VENV" "$VENV/bin" "$VENV/pyvenv.cfg" 2>/dev/null | while read -r f; do
        sed -i "s|$VENV|$PREFIX/venv|g" "$f"
    done
fi

# -- models, docs, configs ----------------------------------------------------------------------
# A bundle is changed on the line PC: `calibrate thresholds`, `dual-threshold --write` and
# `evaluate --record` write into it. models/.installed/<name>.sha256 records the checksums of the
# shipped copy install.sh last put there (in place, or beside it as <name>.shipped): a bundle
# still equal to it is replaced by a newer shipped one; a changed one is kept, the new shipped one
# put beside it. A release that did not change the bundle has nothing to offer: no word then.
mkdir -p "$ROOT$PREFIX/models"
MANIFESTS=$ROOT$PREFIX/models/.installed
checksums() { (cd "$1" && find . -type f -print | LC_ALL=C sort | while read -r f; do sha256sum "$f"; done); }
if [ -d "$MODELS" ]; then
    mkdir -p "$MANIFESTS"
    for bundle in "$MODELS"/*/; do
        [ -f "$bundle/bundle.yaml" ] || continue
        name=$(basename "$bundle")
        dest=$ROOT$PREFIX/models/$name
        manifest=$MANIFESTS/$name.sha256
        shipped=$(checksums "$bundle")
        recorded=$(cat "$manifest" 2>/dev/null || true)
        if [ -d "$dest" ] && [ "$(checksums "$dest")" = "$shipped" ]; then
            rm -rf "$dest.shipped"  # in place already (the same release again, or .shipped moved in)
            printf '%s\n' "$shipped" > "$manifest"
            continue
        fi
        if [ -d "$dest" ] && [ "$(checksums "$dest")" != "$recorded" ]; then
            # changed here since install.sh put it there, or installed before checksums were kept
            if [ "$shipped" != "$recorded" ]; then
                rm -rf "$dest.shipped"
                cp -R "$bundle" "$dest.shipped"
                if [ -z "$recorded" ]; then
                    why="differs from the shipped one and was installed before install.sh kept checksums, so whether it was changed here (calibrated?) cannot be told"
                else
                    why="was changed here (calibrated?) since it was installed"
                fi
                say "warning: $PREFIX/models/$name $why: kept as it is; the shipped bundle is in" \
                    "$PREFIX/models/$name.shipped (compare, then move it in place to use it)"
                printf '%s\n' "$shipped" > "$manifest"
            fi
            continue
        fi
        rm -rf "$dest" "$dest.shipped"
        cp -R "$bundle" "$dest"
        printf '%s\n' "$shipped" > "$manifest"
        say "model bundle $PREFIX/models/$name"
    done
fi
[ -f "$HERE/../README.md" ] && cp "$HERE/../README.md" "$ROOT$PREFIX/README.md"
mkdir -p "$ROOT$CONFDIR/cameras"
cp "$HERE/camera.example.yaml" "$ROOT$CONFDIR/cameras/example.yaml.sample"

# -- state, user, unit --------------------------------------------------------------------------
mkdir -p "$ROOT$STATEDIR/engines" "$ROOT$STATEDIR/recordings"
mkdir -p "$ROOT/usr/lib/sysusers.d" "$ROOT/usr/lib/tmpfiles.d"
printf 'u %s - "Strip inspection daemon" %s\n' "$SERVICE_USER" "$STATEDIR" \
    > "$ROOT/usr/lib/sysusers.d/inspector.conf"
printf 'd %s 0750 %s %s -\nd %s/engines 0750 %s %s -\nd %s/recordings 0750 %s %s -\n' \
    "$STATEDIR" "$SERVICE_USER" "$SERVICE_USER" "$STATEDIR" "$SERVICE_USER" "$SERVICE_USER" \
    "$STATEDIR" "$SERVICE_USER" "$SERVICE_USER" > "$ROOT/usr/lib/tmpfiles.d/inspector.conf"
# StateDirectory= is relative to /var/lib (an absolute one is ignored, with a warning): elsewhere
# STATEDIR is made writable through ProtectSystem=strict by ReadWritePaths= instead
case "$STATEDIR" in
    /var/lib/*) STATE_LINE="StateDirectory=${STATEDIR#/var/lib/}" ;;
    *) STATE_LINE="ReadWritePaths=$STATEDIR" ;;
esac
# a supplementary group missing on the machine fails the unit's start (216/GROUP): list only those
# that exist (with DESTDIR, in its etc/group where it has one, else on this machine)
has_group() {
    if [ -n "$ROOT" ] && [ -f "$ROOT/etc/group" ]; then
        grep -q "^$1:" "$ROOT/etc/group"
    else
        getent group "$1" >/dev/null 2>&1
    fi
}
GROUPS_FOUND=
for g in $SUPPLEMENTARY_GROUPS; do
    if has_group "$g"; then
        GROUPS_FOUND="${GROUPS_FOUND:+$GROUPS_FOUND }$g"
    else
        say "no group $g on this machine: left out of the unit's SupplementaryGroups"
    fi
done
if [ -n "$GROUPS_FOUND" ]; then
    GROUPS_SED="s|^SupplementaryGroups=.*$|SupplementaryGroups=$GROUPS_FOUND|"
else
    GROUPS_SED="/^SupplementaryGroups=/d"
fi
mkdir -p "$ROOT$UNITDIR"
sed -e "s|/opt/inspector|$PREFIX|g" -e "s|/etc/inspector|$CONFDIR|g" \
    -e "s|/var/lib/inspector|$STATEDIR|g" -e "s|^User=inspector$|User=$SERVICE_USER|" \
    -e "s|^Group=inspector$|Group=$SERVICE_USER|" \
    -e "s|^StateDirectory=inspector$|$STATE_LINE|" -e "$GROUPS_SED" \
    "$HERE/inspector@.service" > "$ROOT$UNITDIR/inspector@.service"
chmod 0644 "$ROOT$UNITDIR/inspector@.service"
say "unit $UNITDIR/inspector@.service"

if [ -n "$ROOT" ]; then
    say "scratch-root install in $ROOT: user, ownership and systemctl left to the target system"
    say "(run there: systemd-sysusers; systemd-tmpfiles --create; systemctl daemon-reload)"
    exit 0
fi

# -- the real system only -----------------------------------------------------------------------
if command -v systemd-sysusers >/dev/null 2>&1; then
    systemd-sysusers /usr/lib/sysusers.d/inspector.conf
elif ! id "$SERVICE_USER" >/dev/null 2>&1; then
    useradd --system --home-dir "$STATEDIR" --shell /usr/sbin/nologin "$SERVICE_USER"
fi
for g in $GROUPS_FOUND; do
    usermod -a -G "$g" "$SERVICE_USER" 2>/dev/null || true
done
# the service's own: StateDirectory= would chown it at start, ReadWritePaths= does not
chown -R "$SERVICE_USER:$SERVICE_USER" "$STATEDIR"
chmod 0750 "$STATEDIR" "$STATEDIR/engines" "$STATEDIR/recordings"
RUNNING=
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    RUNNING=$(systemctl list-units --plain --no-legend --state=active 'inspector@*.service' 2>/dev/null \
              | awk '{printf "%s ", $1}')
fi
if [ -n "$RUNNING" ]; then
    # not restarted here: that stops inspection, which the line must allow. Until then they run
    # the version they started with, and refuse a reload (it would mix the two versions' code).
    say "running instances keep the version they started with; restart them when the line allows:"
    say "  systemctl restart $RUNNING"
    # a newer version may refuse a config the old one took, and a refused start (exit 2) is not
    # retried: found now, while the old version still inspects, not at the restart
    say "first check that the new version takes each of their configs (the camera is left alone):"
    for unit in $RUNNING; do
        name=${unit#inspector@}
        name=${name%.service}
        say "  $PREFIX/venv/bin/inspector check --no-source --config $CONFDIR/cameras/$name.yaml"
    done
fi
say "done. Put a camera config in $CONFDIR/cameras/<name>.yaml (see example.yaml.sample), then:"
say "  $PREFIX/venv/bin/inspector check --user $SERVICE_USER --config $CONFDIR/cameras/<name>.yaml"
say "  systemctl enable --now inspector@<name>"
