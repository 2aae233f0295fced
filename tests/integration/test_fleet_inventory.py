"""The fleet inventory as an operator writes it, beyond the tidy cases: every odd line is refused naming its line
and what is wrong, one host spelled two ways is one host, and the worker ids the gateway derives are the ones
the hosts' start_multi_gpu.sh gives their workers (else the gateway would route no job of theirs)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.fleet import FleetError, load_inventory, parse_inventory

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("text", "message"), [
    # str.isdigit() takes other scripts' digits: int() then reads them or crashes
    ("10.0.0.5 ８０００ 1\n", "line 1: character '８' (U+FF18) at column 10"),
    ("10.0.0.5 8000 ²\n", "line 1: character '²' (U+00B2)"),
    # whitespace other than spaces and tabs is no separator, and no line break either
    ("10.0.0.5\u00a08000 1\n", "line 1: character '\\xa0' (U+00A0)"),
    ("# a\n10.0.0.5\x0b8000 1\n10.0.0.6 8000 x\n", "line 2: character '\\x0b' (U+000B)"),
    ("# a\u2028b\n10.0.0.6 8000 x\n", "line 2: NUM_WORKERS 'x'"),  # in a comment: harmless, and no line break
    ("10.0.0.5 8000 1\x00\n", "line 1: character '\\x00'"),
    # a line counted as editors count them: \x0c, \x1c, \x85 ... end no line
    ("# one\x0c two\x1c three\x85\n10.0.0.6 8000 x\n", "line 2: NUM_WORKERS 'x'"),
    # one host, two spellings: DNS ignores case; IPv6 and IPv4-mapped addresses have several forms
    ("GPU1.internal 8000 1\ngpu1.INTERNAL 8000 1\n", "line 2: gpu1.INTERNAL port 8000 is already a worker of line 1"),
    ("fd00::7 9000 2\n[FD00:0:0::7] 9001 1\n", "line 2: FD00:0:0::7 port 9001 is already a worker of line 1"),
    ("10.0.0.5 9000 1\n::ffff:10.0.0.5 9000 1\n", "line 2: ::ffff:10.0.0.5 port 9000 is already a worker"),
    # no worker listens on a group or broadcast address
    ("224.0.0.1 8000 1\n", "line 1: 224.0.0.1 is a multicast or broadcast address"),
    ("ff02::1 8000 1\n", "line 1: ff02::1 is a multicast or broadcast address"),
    ("255.255.255.255 8000 1\n", "line 1: 255.255.255.255 is a multicast or broadcast address"),
    # an id the workers and the renderer cannot take, said as such (not "letters, digits and underscores")
    ("gpu-node-0001.rack-17.datacenter-west.region-2.example.internal 8000 1\n", "line 1: the worker id of"),
    ("10.0.0.5 8000 99999999999999999999999999\n", "line 1: NUM_WORKERS '99999999999999999999999999'"),
    ("10.0.0.5 99999999999999999999999 1\n", "line 1: BASE_PORT '99999999999999999999999'"),
])
def test_odd_lines_are_refused_naming_the_line(text, message):
    with pytest.raises(FleetError) as caught:
        parse_inventory(text, "fleet.conf")
    assert message in str(caught.value), str(caught.value)


def test_a_file_saved_with_a_byte_order_mark_and_crlf_reads_as_written(tmp_path):
    path = tmp_path / "fleet.conf"
    path.write_bytes("\ufeff# fleet\r\n10.0.0.5\t8000 2 fp4\r\n\r\n10.0.0.6 8000 1 bf16  # q\r\n".encode())
    hosts = load_inventory(str(path))
    assert [(h.address, h.line, h.modes) for h in hosts] == [("10.0.0.5", 2, ["fp4", "fp4"]), ("10.0.0.6", 4, ["bf16"])]
    path.write_bytes("\ufeff10.0.0.5 8000 2\r\n10.0.0.6 8000 0\r\n".encode())
    with pytest.raises(FleetError, match="line 2: NUM_WORKERS '0'"):
        load_inventory(str(path))


@pytest.mark.parametrize("address", ["10.0.0.5", "FD00:0::7", "[fd00:0:0::7]", "fd00::7", "::ffff:10.0.0.5",
                                     "GPU-7.Internal", "gpu-7.internal"])
def test_the_gateway_derives_the_ids_the_hosts_give_their_workers(address):
    """The inventory line a host prints (`FLUX_HOST BASE_PORT ...`) routes to the ids its workers were given."""
    [host] = parse_inventory(f"{address} 8000 2\n")
    script = f'source "{ROOT}/scripts/lib.sh"; for p in 8000 8001; do worker_id_for "$p"; done'
    result = subprocess.run(["bash", "-c", script], env={"PATH": "/usr/bin:/bin", "FLUX_HOST": address,
                                                         "WORKERS_ONLY": "1"},
                            capture_output=True, text=True, timeout=30, check=True)
    assert [w.id for w in host.workers] == result.stdout.split()


def test_status_columns_fit_long_addresses_and_a_fleet_all_down_says_so():
    """`status -f` / `monitor -f`: a long address (IPv6, a long host name) and its long worker ids keep the
    columns under their headings; with no worker ready anywhere there are no "other hosts" to take a share."""
    import io

    from scripts.fleet import status
    from tests.ports import free_port

    hosts = parse_inventory(f"0:0:0:0:0:ffff:127.0.0.1 {free_port()} 1\n127.0.0.1 {free_port()} 1 bf16\n")
    out = io.StringIO()
    assert status(hosts, out=out) == 1
    lines = out.getvalue().splitlines()
    header, rows = lines[1], lines[2:4]
    for heading in ("WORKER", "PORT", "STATE"):
        col = header.index(heading)
        for row in rows:
            assert row[col - 1] == " " and row[col] != " ", (heading, header, row)
    assert [row.split()[4] for row in rows] == ["down", "down"]
    assert "the gateway sends its share to the other hosts" not in out.getvalue()
    assert "no worker of the fleet is ready" in out.getvalue()


@pytest.mark.parametrize(("address", "gateway_addr", "loops"), [
    ("127.0.0.1", "127.0.0.1", True), ("localhost", "127.0.0.1", True), ("127.0.0.2", "", True),
    ("127.0.0.2", "127.0.0.1", False), ("10.255.255.1", "", False),
])
def test_a_worker_at_the_gateways_own_address_and_port_is_refused(tmp_path, address, gateway_addr, loops):
    """nginx would proxy such a "worker" to itself, round and round until the per-address connection limit
    answers 429: `gateway -f` refuses the inventory before anything starts."""
    from tests.ports import free_port

    port = free_port()
    inventory = tmp_path / "fleet.conf"
    inventory.write_text(f"# the gateway's host\n{address} {port} 1\n")
    env = {"PATH": os.environ["PATH"], "FLUX_RUN_DIR": str(tmp_path / "run"), "NGINX_PORT": str(port),
           "NGINX_ADDR": gateway_addr, "NO_COLOR": "1"}
    check = [sys.executable, str(ROOT / "scripts" / "fleet.py"), "check", "-f", str(inventory)]
    result = subprocess.run(check + ["--gateway-addr", gateway_addr, "--gateway-port", str(port)], capture_output=True,
                            text=True, timeout=30)
    if not loops:
        assert result.returncode == 0, result.stderr
        return
    assert result.returncode == 2 and "line 2: worker" in result.stderr and "is the gateway itself" in result.stderr
    started = subprocess.run([str(ROOT / "start_multi_gpu.sh"), "gateway", "-f", str(inventory)], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=60)
    assert started.returncode != 0 and "is the gateway itself" in started.stderr, started.stdout + started.stderr
    assert not (tmp_path / "run" / "gateway" / "nginx.pid").exists()
