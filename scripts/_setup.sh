# Shared by scripts/test and scripts/run: installs the Debian packages named
# in $packages when they are missing (non-interactively, as root or through
# sudo), picks a Python that may pip-install (a project .venv on Debian's own
# python3, PEP 668), and installs this project editable with $extras.
# Sets $python.  Sourced, not run: the caller has cd'ed to the repo root.


installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"
}

python_is_distro_managed() {
    # PEP 668: Debian's own python3 refuses `pip install` outside a venv.
    "${PYTHON:-python3}" - <<'EOF' 2>/dev/null
import os, sys, sysconfig
marker = os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")
sys.exit(0 if os.path.exists(marker) and sys.prefix == sys.base_prefix else 1)
EOF
}

missing=()
# The commands that stand for the packages, for systems without dpkg.
commands=()
for pkg in "${packages[@]}"; do
    case "$pkg" in dnsutils) commands+=(dig) ;; *) commands+=("$pkg") ;; esac
done
if command -v dpkg-query >/dev/null 2>&1; then
    for pkg in "${packages[@]}"; do
        installed "$pkg" || missing+=("$pkg")
    done
    command -v "${PYTHON:-python3}" >/dev/null 2>&1 || missing+=(python3)
    if python_is_distro_managed && [ ! -x .venv/bin/python ]; then
        installed python3-venv || missing+=(python3-venv)
    fi
else
    for cmd in "${commands[@]}"; do
        command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || {
            echo "$0: '$cmd' is missing and this is not a Debian system;" \
                "install ${packages[*]} yourself" >&2
            exit 1
        }
    done
fi

if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" -eq 0 ]; then
        as_root=()
    elif command -v sudo >/dev/null 2>&1; then
        as_root=(sudo)
    else
        echo "$0: missing Debian packages: ${missing[*]}" >&2
        echo "  run as root: apt-get install --no-install-recommends ${missing[*]}" >&2
        exit 1
    fi
    echo "$0: installing ${missing[*]}" >&2
    # "No configuration": no /etc/postfix/main.cf and no system Postfix
    # started; the tests run their own private instance.
    printf '%s\n' \
        "postfix postfix/main_mailer_type select No configuration" \
        "postfix postfix/mailname string localhost" |
        "${as_root[@]}" debconf-set-selections
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

python="${PYTHON:-python3}"
if python_is_distro_managed; then
    # Debian's python3 (PEP 668): keep our packages in a project venv instead
    # of forcing them into the system's site-packages.
    [ -x .venv/bin/python ] || "$python" -m venv .venv
    python=.venv/bin/python
fi

PIP_ROOT_USER_ACTION=ignore "$python" -m pip install -q --disable-pip-version-check -e ".${extras:-}"
