#!/bin/sh
# Build the Debian package gitbackup_<version>_all.deb from this tree with
# Debian's own tools (dpkg-deb, help2man, gzip); no debhelper, no build
# dependencies beyond those.  Usage: packaging/build-deb.sh [OUTDIR]
# (default: build/ at the top of the tree).  Prints the path of the .deb.
#
# The version comes from one place, the scripts themselves: `client.py
# --version`, else the first `VERSION = '...'` line of modules/_core.py,
# else of client.py.  The Debian revision is DEB_REVISION (default 1).
# Same tree, same SOURCE_DATE_EPOCH (default: the last commit's time, else
# the newest source file's) -> the same .deb, byte for byte.
set -eu
umask 022
export LC_ALL=C.UTF-8 TZ=UTC

SRC=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:-$SRC/build}
PYTHON=${PYTHON:-python3}
DEB_REVISION=${DEB_REVISION:-1}
MAINTAINER=${DEB_MAINTAINER:-'Seed 8221422d maintainers <maintainers@users.noreply.r-seed-8221422d.example>'}
PKG=gitbackup

die() { echo "build-deb.sh: $*" >&2; exit 1; }
for tool in dpkg-deb help2man gzip md5sum; do
    command -v "$tool" >/dev/null 2>&1 ||
        die "$tool not found (apt-get install dpkg-dev help2man gzip coreutils; or make deps)"
done

# -- the version --------------------------------------------------------------
# The last word, should it ever print "client.py 0.1".
upstream=$("$PYTHON" "$SRC/client.py" --version 2>/dev/null | awk 'END { print $NF }') ||
    upstream=
if [ -z "$upstream" ]; then
    for f in "$SRC/modules/_core.py" "$SRC/client.py"; do
        [ -f "$f" ] || continue
        upstream=$(sed -n "s/^VERSION = ['\"]\([^'\"]*\)['\"].*/\1/p" "$f" | head -n 1)
        [ -n "$upstream" ] && break
    done
fi
printf '%s\n' "$upstream" | grep -Eq '^[0-9][A-Za-z0-9.+~]*$' ||
    die "no usable version (client.py --version gave '$upstream')"
VERSION=$upstream-$DEB_REVISION

if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
    SOURCE_DATE_EPOCH=$(git -C "$SRC" log -1 --format=%ct 2>/dev/null) ||
        SOURCE_DATE_EPOCH=
    # No git (a tarball, or a tree git refuses to read as this user): the
    # newest source file, which is as stable as the tree.
    [ -n "$SOURCE_DATE_EPOCH" ] || SOURCE_DATE_EPOCH=$(find "$SRC/client.py" \
        "$SRC/server.py" "$SRC/sendmail.py" "$SRC/modules" "$SRC/packaging" \
        -type f -printf '%T@\n' | sort -n | tail -n 1 | cut -d. -f1)
fi
export SOURCE_DATE_EPOCH
COMMIT=$(git -C "$SRC" rev-parse --short HEAD 2>/dev/null) || COMMIT=unknown

# -- the tree of the package ----------------------------------------------------
mkdir -p "$OUT"
WORK=$(mktemp -d "$OUT/.build-deb.XXXXXX")
trap 'rm -rf "$WORK"' EXIT INT TERM
ROOT=$WORK/root
SHARE=$ROOT/usr/share/$PKG
DOC=$ROOT/usr/share/doc/$PKG

install -d "$ROOT/DEBIAN" "$ROOT/usr/bin" "$SHARE/modules" "$DOC" \
    "$ROOT/etc/$PKG" "$ROOT/usr/share/man/man1" "$ROOT/lib/systemd/system" \
    "$ROOT/usr/share/lintian/overrides"
install -m 0755 "$SRC/client.py" "$SRC/server.py" "$SRC/sendmail.py" "$SHARE/"
# Every module, the shared plumbing (modules/_*.py) included.
install -m 0644 "$SRC"/modules/*.py "$SHARE/modules/"
install -m 0644 "$SRC/conf.example.ini" "$SHARE/"
install -m 0755 "$SRC/packaging/bin/gitbackup-client" \
    "$SRC/packaging/bin/gitbackup-server" "$ROOT/usr/bin/"
install -m 0644 "$SRC"/packaging/systemd/*.service \
    "$SRC"/packaging/systemd/*.timer "$ROOT/lib/systemd/system/"

# The conffile: the example with every setting disabled, so that an
# unedited install fails loudly ("no [client] section", exit 2) instead
# of backing up to 172.16.2.57.
{
    echo '; gitbackup configuration of the Debian package (gitbackup-client and'
    echo '; gitbackup-server read it unless --config or $GITBACKUP_CONFIG says'
    echo '; otherwise).  It is the documented example with every setting'
    echo '; disabled by a leading "#": as installed it configures nothing, and'
    echo '; every command exits 2 ("no [client] section").  Enable what you'
    echo '; need (sed -i "s/^#//" enables all of it; then edit the values, and'
    echo '; delete the sections a client-only or node-only host does not use),'
    echo '; then run gitbackup-client check / gitbackup-server check.'
    echo ';'
    sed -e '/^[[:space:]]*$/b' -e '/^[;#]/b' -e 's/^/#/' "$SRC/conf.example.ini"
    # conf.example.ini may lack a final newline.
    [ -z "$(tail -c 1 "$SRC/conf.example.ini")" ] || echo
} > "$ROOT/etc/$PKG/backup.ini"
chmod 0644 "$ROOT/etc/$PKG/backup.ini"

# -- documentation --------------------------------------------------------------
install -m 0644 "$SRC/packaging/debian/copyright" "$DOC/copyright"
install -m 0644 "$SRC/packaging/debian/lintian-overrides" \
    "$ROOT/usr/share/lintian/overrides/$PKG"
for f in README.md SECURITY.md; do
    gzip -9n < "$SRC/$f" > "$DOC/$f.gz"
done
if [ -d "$SRC/docs" ]; then
    install -d "$DOC/docs"
    for f in "$SRC"/docs/*.md; do
        gzip -9n < "$f" > "$DOC/docs/$(basename "$f").gz"
    done
fi
# The worked modules docs/modules.md copies (not executable in a doc
# directory: the copy command there sets the mode).
if [ -d "$SRC/docs/examples" ]; then
    install -d "$DOC/examples"
    install -m 0644 "$SRC"/docs/examples/* "$DOC/examples/"
fi
date_rfc=$(date -u -d "@$SOURCE_DATE_EPOCH" -R)
sed -e "s/@VERSION@/$VERSION/" -e "s/@COMMIT@/$COMMIT/" \
    -e "s/@MAINTAINER@/$MAINTAINER/" -e "s/@DATE@/$date_rfc/" \
    "$SRC/packaging/debian/changelog.in" | gzip -9n > "$DOC/changelog.Debian.gz"

# -- man pages from --help (help2man), each command's own --help appended ------
roff_block() {  # preformatted text, safe for roff
    echo '.nf'
    sed -e 's/\\/\\e/g' -e "s/^\\([.']\\)/\\\\\\&\\1/"
    echo '.fi'
}
# --help as the packaged commands print it: they set $GITBACKUP_CONFIG.
export GITBACKUP_CONFIG=/etc/$PKG/backup.ini
for side in client server; do
    script=$SHARE/$side.py
    runner=$WORK/gitbackup-$side
    printf '#!/bin/sh\nexec %s %s "$@"\n' "$PYTHON" "$script" > "$runner"
    chmod 0755 "$runner"
    include=$WORK/$side.h2m
    {
        echo '[COMMANDS]'
        commands=$("$PYTHON" "$script" --help |
            sed -n '/^  COMMAND$/,/^$/s/^    \([a-z][a-z-]*\).*/\1/p')
        [ -n "$commands" ] || die "$side.py --help lists no commands"
        for c in $commands; do
            echo '.SS "'"$c"'"'
            "$PYTHON" "$script" "$c" --help | roff_block
        done
        cat "$SRC/packaging/debian/gitbackup.man-files"
    } > "$include"
    case $side in
        client) what='record, prepare and push backup requests' ;;
        server) what='take in backup requests, pull the data, keep it' ;;
    esac
    # The package's commands are gitbackup-client/-server, whatever name
    # argparse prints (client.py); a path such as /path/to/server.py stays.
    help2man --no-info --section=1 --source="gitbackup $upstream" \
        --manual='gitbackup' --version-string="$upstream" --name="$what" \
        --include="$include" "$runner" |
        sed -e "s/\\(^\\|[^/a-z]\\)$side\\.py\\([^.a-z]\\|$\\)/\\1gitbackup\\\\-$side\\2/g" |
        gzip -9n > "$ROOT/usr/share/man/man1/gitbackup-$side.1.gz"
done
rm -f "$WORK"/gitbackup-client "$WORK"/gitbackup-server

# -- control files -------------------------------------------------------------
install -m 0644 "$SRC/packaging/debian/conffiles" "$ROOT/DEBIAN/conffiles"
install -m 0755 "$SRC/packaging/debian/postinst" "$SRC/packaging/debian/prerm" \
    "$ROOT/DEBIAN/"
size=$(du -k -s --exclude=DEBIAN "$ROOT" | cut -f1)
sed -e "s/@VERSION@/$VERSION/" -e "s/@MAINTAINER@/$MAINTAINER/" \
    -e "s/@INSTALLED_SIZE@/$size/" "$SRC/packaging/debian/control.in" \
    > "$ROOT/DEBIAN/control"
(cd "$ROOT" && find . -path ./DEBIAN -prune -o -type f -print | sed 's|^\./||' |
    LC_ALL=C sort | xargs md5sum) > "$ROOT/DEBIAN/md5sums"
chmod 0644 "$ROOT/DEBIAN/md5sums"

find "$ROOT" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
deb=$OUT/${PKG}_${VERSION}_all.deb
dpkg-deb --root-owner-group -Zxz --build "$ROOT" "$deb" >/dev/null
echo "$deb"
