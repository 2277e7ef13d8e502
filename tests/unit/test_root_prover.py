"""Sudo mode's LAN proof: the `arp-prove` root helper, and the hooks asking it.

The helper as root between two private network namespaces (no packet leaves them); the
caller against stand-ins for sudo and the helper, including one that fails (back to arping).
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from repmgr_vip.adapters import arp, network, tcpreset
from repmgr_vip.config.schema import load_config
from tests.unit.conftest import IP, link_mac, veth_namespaces

VIP = "192.0.2.100"


@pytest.fixture
def two_hosts() -> Iterator[tuple[str, str]]:
    """A prover's namespace and a holder's, a veth pair between them."""
    with veth_namespaces("prv", ("p0", "h0"), (("192.0.2.1/24",), ("192.0.2.2/24",))) as names:
        yield names


_HELPER = """
import sys
sys.argv = ["repmgr-vip", "arp-prove", "p0", sys.argv[1]]
from repmgr_vip.cli.quick import main
raise SystemExit(main())
"""


def test_the_root_helper_proves_once_per_order_and_ends_at_end_of_file(
        two_hosts: tuple[str, str]) -> None:
    prover, holder = two_hosts
    src = str(Path(arp.__file__).resolve().parents[2])
    holder_mac = link_mac(holder, "h0")
    subprocess.run([IP, "-n", holder, "address", "add", f"{VIP}/24", "dev", "h0"],
                   check=True, timeout=10)
    helper = subprocess.Popen([IP, "netns", "exec", prover, "env", f"PYTHONPATH={src}",
                               sys.executable, "-c", _HELPER, VIP], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert helper.stdin is not None and helper.stdout is not None
        assert helper.stdout.readline().strip() == arp.READY

        def prove() -> tuple[str, float]:
            assert helper.stdin is not None and helper.stdout is not None
            began = time.monotonic()
            helper.stdin.write(arp.PROVE + "\n")
            helper.stdin.flush()
            return helper.stdout.readline().strip(), time.monotonic() - began

        answer, took = prove()
        assert answer == holder_mac.lower(), answer
        assert arp.LAN_WINDOW <= took < 1.0, took  # complete: it listened the whole window
        subprocess.run([IP, "-n", holder, "address", "del", f"{VIP}/24", "dev", "h0"],
                       check=True, timeout=10)
        answer, took = prove()
        assert answer == arp.SILENCE and took < 1.0, (answer, took)
        helper.stdin.close()
        assert helper.wait(timeout=5) == 0
    finally:
        if helper.poll() is None:
            helper.kill()
        helper.wait(timeout=10)


@pytest.mark.parametrize("helper", ["arp-prove", "refuse-stale"])
def test_the_root_helpers_refuse_arguments_no_sudoers_line_should_allow(
        helper: str, capsys: pytest.CaptureFixture[str]) -> None:
    """What sudo runs as root takes its interface and address from the line only, checked
    as strictly as the config checks them: one line on stderr, USAGE, nothing done."""
    def main(interface: str, address: str) -> int:
        if helper == "arp-prove":
            return arp.helper_main(arp.helper_prove, interface, address, "ARP proof")
        return tcpreset.refuse_main(interface, address)

    bad = [("h0;id", VIP), ("h0", "127.0.0.1"), ("h0", "not-an-address"), ("h0", "ff02::1")]
    if helper == "arp-prove":
        bad.append(("h0", "2001:db8::1"))  # ARP is IPv4's: IPv6 has nd-probe
    for interface, address in bad:
        assert main(interface, address) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err


def _script(path: Path, body: str) -> str:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


def _sudo_config(write_config: Callable[..., Path], tmp_path: Path, helper_body: str,
                 lan_proof: bool = True) -> network.Config:
    """Sudo mode whose `sudo` runs the line as is and whose helper is a stand-in; arping
    stands in too: it says it sent a probe and heard nothing (as `arping -D` on silence)."""
    sudo = _script(tmp_path / "sudo", 'shift\nexec "$@"\n')  # drops -n
    arping = _script(tmp_path / "arping", "sleep 0.05\necho 'Sent 1 probes (1 broadcast(s))'\n")
    helper = _script(tmp_path / "repmgr-vip", helper_body)
    extra = (f'state_dir = "{tmp_path}"\n[privileges]\nmode = "sudo"\n'
             f'[commands]\nsudo = "{sudo}"\narping = "{arping}"\n'
             f'[remote]\ncommand = "{helper}"\n[daemon]\nlan_proof = {str(lan_proof).lower()}\n')
    return load_config(write_config(address=f"{VIP}/24", interface="eth0", extra=extra),
                       check_host=False)


# answers a holder's MAC first, silence after; writes each order it got to a file beside it
_STAND_IN = """echo ready
first=1
while read order; do
  echo "$order" >> "$(dirname "$0")/orders"
  if [ $first = 1 ]; then echo 02:aa:00:00:00:01; first=0; else echo -; fi
done
"""


def test_the_hooks_prove_through_one_root_helper_kept_for_the_round(
        write_config: Callable[..., Path], tmp_path: Path) -> None:
    from repmgr_vip.app.hooks import local_hands

    hands = local_hands(_sudo_config(write_config, tmp_path, _STAND_IN))
    assert isinstance(hands.network, network.VipNetwork) and hands.network.lan_proof
    assert hands.network.probe().answered_by == ("02:aa:00:00:00:01",)
    assert hands.network.probe().answered_by == ()
    assert hands.network.probe().answered_by == ()
    assert (tmp_path / "orders").read_text().split() == [arp.PROVE] * 3  # one helper, 3 asks
    [prover] = hands.network._provers.values()
    child = prover.child
    prover.close()
    assert child is not None and child.wait(timeout=5) == 0  # end of file: it ended


def test_a_helper_that_fails_leaves_the_proof_to_arping(
        write_config: Callable[..., Path], tmp_path: Path) -> None:
    """An old sudoers file without the line: sudo refuses, the hook proves as before."""
    net = network.VipNetwork(_sudo_config(write_config, tmp_path, "exit 1\n"), lan_proof=True)
    assert net.probe().answered_by == ()  # arping's silence
    assert net._prover_failed
    garbled = network.VipNetwork(_sudo_config(
        write_config, tmp_path, "echo ready\nread order\necho 'not a mac'\n"), lan_proof=True)
    assert garbled.probe().answered_by == () and garbled._prover_failed


def test_without_lan_proof_the_hooks_keep_arping(
        write_config: Callable[..., Path], tmp_path: Path) -> None:
    from repmgr_vip.app.hooks import local_hands

    hands = local_hands(_sudo_config(write_config, tmp_path, _STAND_IN, lan_proof=False))
    assert hands.network.probe().answered_by == ()
    assert not (tmp_path / "orders").exists()
