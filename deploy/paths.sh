# Shell functions install.sh and uninstall.sh share (sourced, POSIX sh): both take PREFIX,
# CONFDIR, STATEDIR and UNITDIR from the user, and both must read them the same way before
# install.sh chowns STATEDIR or uninstall.sh removes them.

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
# "/", a top-level folder or a system one, as a typo in PREFIX and friends makes it (install.sh
# would chown -R STATEDIR, uninstall.sh rm -rf them).
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

# PREFIX, CONFDIR, STATEDIR, UNITDIR: absolute, normalised, and (but UNITDIR) no system folder.
# $1 reports an error and exits: install.sh's die, uninstall.sh's refuse.
check_install_dirs() {
    for v in "PREFIX=$PREFIX" "CONFDIR=$CONFDIR" "STATEDIR=$STATEDIR" "UNITDIR=$UNITDIR"; do
        case "${v#*=}" in
            /*) ;;
            *) "$1" "$v is not an absolute path" ;;
        esac
    done
    PREFIX=$(normpath "$PREFIX")
    CONFDIR=$(normpath "$CONFDIR")
    STATEDIR=$(normpath "$STATEDIR")
    UNITDIR=$(normpath "$UNITDIR")
    for v in "PREFIX=$PREFIX" "CONFDIR=$CONFDIR" "STATEDIR=$STATEDIR"; do
        ! system_dir "${v#*=}" || "$1" "$v is a system folder: name one of its own (e.g. ${v#*=}/inspector)"
    done
}
