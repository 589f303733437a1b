"""A lab of SSH hosts on this machine, for `ray up` with Ray's `local` provider.

Each host is a set of Linux namespaces with its own sshd as process 1: a network namespace (its own address
on a private bridge, 10.201.0.0/24, and its own ports), a PID namespace (so `ray stop`, which `ray up` and
`ray down` run on the host, sees and kills only that host's processes and never a Ray cluster that runs on
this machine beside the lab), a mount namespace (its own /tmp, where Ray keeps its sessions and the local
provider its state file) and a UTS namespace (its own hostname, which /etc/hosts maps to its address, as
on a real machine: Gloo advertises the address its hostname resolves to). All hosts share one home folder,
the way machines share an NFS home, so checkpoints on several nodes land in one place.

Killing a host's sshd (process 1 of its PID namespace) kills every process on that host: whatever a test
leaves running, :meth:`Lab.stop` takes it down, then deletes the namespaces and the bridge.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from tests.helpers import wait_for

BRIDGE = "mlraylab0"
NETNS_PREFIX = "mlraylab-"
GATEWAY = "10.201.0.1"
PREFIX_LEN = 24
TOOLS = ("ip", "unshare", "ssh", "ssh-keygen", "rsync", "/usr/sbin/sshd")

SSHD_CONFIG = """\
ListenAddress {address}
HostKey /tmp/sshd/host_key
PidFile /tmp/sshd/sshd.pid
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
AllowTcpForwarding local
X11Forwarding no
PrintMotd no
Subsystem sftp internal-sftp
"""

# Run by `ip netns exec` in a fresh PID, mount and UTS namespace: the host's own passwd (root's home in
# the shared /home/root), hosts, resolv.conf, /home and /tmp, then sshd as process 1. `--kill-child` takes
# the whole PID namespace down when `unshare` dies, however it dies. The lab has no DNS server (its hosts
# reach nothing beyond the bridge), so resolv.conf names none: a lookup that /etc/hosts cannot answer fails
# at once instead of waiting for a server it cannot reach (c10d looks up every peer it accepts).
BOOT = ("mount --bind {passwd} /etc/passwd && mount --bind {hosts} /etc/hosts"
        " && mount --bind {resolv} /etc/resolv.conf && mount --bind {homes} /home{keep_before}"
        " && mount --bind {tmp} /tmp{keep_after} && hostname {name} && mkdir -p /run/sshd"
        " && exec /usr/sbin/sshd -D -e -f /tmp/sshd/sshd_config")


def _kept_paths() -> list[str]:
    """The checkout and its virtualenv ("the machine image"), when they live under /tmp (a CI clone): each
    host gets its own /tmp, so they are carried over at the same path (scripts name their python by it)."""
    import sys

    root = Path(__file__).resolve().parents[2]
    paths = {str(root), str(Path(sys.prefix).resolve())}
    under_tmp = sorted(p for p in paths if p.startswith("/tmp/"))
    return [p for p in under_tmp if not any(p != q and p.startswith(q + "/") for q in under_tmp)]


def _keep_mounts() -> tuple[str, str]:
    """Shell fragments for BOOT: stash the kept paths on a private tmpfs before /tmp is replaced, then
    bind them back at their own paths."""
    kept = _kept_paths()
    if not kept:
        return "", ""
    before = " && mount -t tmpfs mlraylab-keep /mnt" + "".join(
        f" && mkdir /mnt/k{i} && mount --bind {path} /mnt/k{i}" for i, path in enumerate(kept))
    after = "".join(f" && mkdir -p {path} && mount --bind /mnt/k{i} {path}" for i, path in enumerate(kept))
    return before, after


def missing_prerequisites() -> str | None:
    """Why the lab cannot run here, or None."""
    if os.geteuid() != 0:
        return "the lab needs root (network, PID and mount namespaces)"
    absent = [tool for tool in TOOLS if shutil.which(tool) is None]
    if absent:
        return f"missing {', '.join(absent)}: apt-get install openssh-server rsync iproute2 (.ci/run does)"
    return None


def run(args: list[str], *, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}): {done.stderr.strip()[-1000:]}")
    return done


@dataclass
class Host:
    name: str
    address: str
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def netns(self) -> str:
        return NETNS_PREFIX + self.name


class Lab:
    """Hosts by name (``{"head": "10.201.0.2", ...}``) under ``root``; :meth:`start`, then :meth:`stop`."""

    def __init__(self, root: Path, hosts: dict[str, str]) -> None:
        self.root = root
        self.hosts = {name: Host(name, address) for name, address in hosts.items()}
        self.key = root / "id_ed25519"
        self.home = root / "homes" / "root"  # every host's /home/root

    # -- life cycle ---------------------------------------------------------------------------------------

    def start(self) -> None:
        remove_stale_lab()
        self.home.joinpath(".ssh").mkdir(parents=True, mode=0o700)
        self.home.chmod(0o700)
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "mlray-lab", "-f", str(self.key)])
        authorized = self.home / ".ssh" / "authorized_keys"
        authorized.write_text(self.key.with_suffix(".pub").read_text())
        authorized.chmod(0o600)
        passwd = self.root / "passwd"
        passwd.write_text("".join(
            _with_home(line, "/home/root") if line.startswith("root:") else line
            for line in Path("/etc/passwd").read_text().splitlines(keepends=True)))
        hosts_file = self.root / "hosts"
        hosts_file.write_text("127.0.0.1 localhost\n" + "".join(
            f"{host.address} {host.name}\n" for host in self.hosts.values()))
        (self.root / "resolv.conf").write_text("options timeout:1 attempts:1\n")
        run(["ip", "link", "add", BRIDGE, "type", "bridge"])
        run(["ip", "addr", "add", f"{GATEWAY}/{PREFIX_LEN}", "dev", BRIDGE])
        run(["ip", "link", "set", BRIDGE, "up"])
        for host in self.hosts.values():
            self._start_host(host, passwd=passwd, hosts_file=hosts_file)
        for host in self.hosts.values():
            wait_for(lambda h=host: _accepts(h.address, 22), timeout=30, what=f"sshd on {host.address}")

    def _start_host(self, host: Host, *, passwd: Path, hosts_file: Path) -> None:
        tmp = self.root / host.name / "tmp"
        sshd = tmp / "sshd"
        sshd.mkdir(parents=True)
        tmp.chmod(0o1777)
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(sshd / "host_key")])
        (sshd / "sshd_config").write_text(SSHD_CONFIG.format(address=host.address))
        ns = host.netns
        run(["ip", "netns", "add", ns])
        # The host end of the veth pair is named after the namespace and plugged into the bridge.
        run(["ip", "link", "add", ns[:15], "type", "veth", "peer", "name", "eth0", "netns", ns])
        run(["ip", "link", "set", ns[:15], "master", BRIDGE, "up"])
        for args in (["addr", "add", f"{host.address}/{PREFIX_LEN}", "dev", "eth0"], ["link", "set", "eth0", "up"],
                     ["link", "set", "lo", "up"], ["route", "add", "default", "via", GATEWAY]):
            run(["ip", "-n", ns, *args])
        keep_before, keep_after = _keep_mounts()
        boot = BOOT.format(passwd=passwd, hosts=hosts_file, resolv=self.root / "resolv.conf", homes=self.home.parent,
                           tmp=tmp, name=host.name, keep_before=keep_before, keep_after=keep_after)
        log = (self.root / f"{host.name}.sshd.log").open("wb")
        host.process = subprocess.Popen(
            ["ip", "netns", "exec", ns, "unshare", "--pid", "--fork", "--mount-proc", "--uts", "--kill-child",
             "sh", "-c", boot],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def stop(self) -> None:
        """Kill every process on every host, the SSH clients that used the lab's key, then the namespaces."""
        for host in self.hosts.values():
            if host.process is None or host.process.poll() is not None:
                continue
            # Process 1 first, so that `unshare` reaps it; its death ends every process in the namespace.
            for init in psutil.Process(host.process.pid).children():
                init.send_signal(signal.SIGKILL)
            try:
                host.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                host.process.kill()  # --kill-child: unshare's death takes its PID namespace down as well
                host.process.wait(timeout=30)
        kill_ssh_clients(self.key)
        remove_stale_lab()

    # -- access -------------------------------------------------------------------------------------------

    def ssh_args(self, name: str) -> list[str]:
        return ["ssh", "-i", str(self.key), "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "LogLevel=ERROR", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10",
                f"root@{self.hosts[name].address}"]

    def ssh(self, name: str, command: str, *, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.ssh_args(name), command], capture_output=True, text=True, timeout=timeout)

    def ray_log(self, name: str, filename: str) -> str:
        """A log of the host's latest Ray session (``monitor.log``), read from this machine: a host's /tmp is
        a folder of the lab, and ``session_latest`` a link that is absolute inside the host."""
        ray_tmp = self.root / name / "tmp" / "ray"
        try:
            session = ray_tmp / Path(os.readlink(ray_tmp / "session_latest")).name
            return (session / "logs" / filename).read_text(errors="replace")
        except OSError:
            return ""

    def processes(self, name: str) -> list[str]:
        """``pid command line`` of every process on the host but sshd, its sessions and the lab's `unshare`."""
        return [line for line in _namespace_processes(self.hosts[name].netns)
                if not line.split(" ", 1)[-1].startswith(("sshd", "unshare "))]


def _with_home(passwd_line: str, home: str) -> str:
    fields = passwd_line.rstrip("\n").split(":")
    fields[5] = home
    return ":".join(fields) + "\n"


def _accepts(address: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex((address, port)) == 0


def _namespace_processes(netns: str) -> list[str]:
    """``pid command line`` of every process in network namespace ``netns`` (seen from this machine)."""
    done = run(["ip", "netns", "pids", netns], check=False)
    lines = []
    for pid in (int(p) for p in done.stdout.split()):
        try:
            lines.append(f"{pid} {' '.join(psutil.Process(pid).cmdline())[:200]}")
        except psutil.NoSuchProcess:
            continue
    return lines


def kill_ssh_clients(key: Path) -> None:
    """SSH clients on this machine that use ``key``: Ray's ControlMaster connections and the tunnels."""
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if cmdline and Path(cmdline[0]).name == "ssh" and str(key) in cmdline:
            try:
                process.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                continue


def remove_stale_lab() -> None:
    """Remove a lab's namespaces and bridge, this run's or one a killed run left behind."""
    names = [line.split()[0] for line in run(["ip", "netns", "list"]).stdout.splitlines() if line.strip()]
    for netns in (name for name in names if name.startswith(NETNS_PREFIX)):
        for pid in run(["ip", "netns", "pids", netns], check=False).stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                continue
        deadline = time.monotonic() + 30
        while run(["ip", "netns", "pids", netns], check=False).stdout.split() and time.monotonic() < deadline:
            time.sleep(0.2)
        run(["ip", "netns", "delete", netns], check=False)
    run(["ip", "link", "delete", BRIDGE], check=False)  # deleting a namespace deletes its veth pair too
