#!/usr/bin/env bash
# Run the test suite: installs what it needs on a fresh Debian/Ubuntu machine (nginx and its
# headers-more module, shellcheck, lsof as root through apt; ./.venv with requirements-dev.txt),
# then pytest. Arguments go to pytest.
#
#   ./run_tests.sh                      everything (about 15 minutes on 2 cores)
#   ./run_tests.sh tests/unit -x        a part
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

missing=()
for tool in nginx shellcheck lsof curl wrk; do
    command -v "$tool" >/dev/null 2>&1 || [[ -x "/usr/sbin/$tool" ]] || missing+=("$tool")
done
# nginx's headers-more module: the rendered config drops the `Server: nginx` header with it
[[ -f /usr/lib/nginx/modules/ngx_http_headers_more_filter_module.so ]] ||
    missing+=(libnginx-mod-http-headers-more-filter)
# the systemd units are checked with systemd-analyze verify (tests/integration/test_scripts_guide.py)
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
# the browser tests (tests/browser) drive a headless Chromium
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
if ((${#missing[@]})); then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
        echo "installing ${missing[*]} with apt-get"
        export DEBIAN_FRONTEND=noninteractive
        # the nginx package would start a system nginx on port 80; tests run their own
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
        rm -f /usr/sbin/policy-rc.d
    else
        echo "missing ${missing[*]}: install them (apt-get install ${missing[*]}); the tests that need them fail" >&2
    fi
fi

scripts/setup_venv.sh requirements-dev.txt
exec .venv/bin/python -m pytest "$@"
