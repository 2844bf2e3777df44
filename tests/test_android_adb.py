"""scripts/android/perfx-adb against a fake `adb` and a fake `ssh` that log their calls.

The fake adb answers from a JSON state file like the real one (devices, pm, pidof, getprop,
forward, push). The fake ssh runs the remote command with `sh` in a fake Termux home, where a fake
`perfx` stands in for the real one, so the shell commands perfx-adb sends are really executed.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "android" / "perfx-adb"

FAKE_ADB = r'''
import json, os, shutil, sys
state_dir = os.environ["FAKE_ANDROID"]
state = json.load(open(os.path.join(state_dir, "state.json")))
argv = sys.argv[1:]
with open(os.path.join(state_dir, "calls.log"), "a") as log:
    log.write(json.dumps(["adb", *argv]) + "\n")
serial = None
if argv[:1] == ["-s"]:
    serial, argv = argv[1], argv[2:]
devices = dict(state["devices"])
if argv == ["devices"]:
    print("List of devices attached")
    for s, st in state["devices"]:
        print(f"{s}\t{st}")
    print()
    sys.exit(0)
if serial is None:
    if len(devices) != 1:
        sys.exit(print("adb: error: more than one device/emulator" if devices else "adb: no devices/emulators found",
                       file=sys.stderr) or 1)
    serial = next(iter(devices))
if serial not in devices:
    sys.exit(print(f"adb: device '{serial}' not found", file=sys.stderr) or 1)
dev = state["device"].get(serial, {})
cmd = argv[0]
if cmd == "shell":
    line = " ".join(argv[1:])
    if line.startswith("pm list packages"):
        print("package:com.termux.api")
        if dev.get("termux"):
            print("package:com.termux")
    elif line == "pidof sshd":
        if dev.get("sshd"):
            print(4321)
        else:
            sys.exit(1)
    elif line.startswith("getprop "):
        print(dev.get("props", {}).get(line.split()[1], ""))
    elif line.startswith("mkdir -p "):
        os.makedirs(line.split(None, 2)[2].strip("'"), exist_ok=True)
    elif line.startswith("rm -f "):
        path = line.split(None, 2)[2].strip("'")
        if os.path.exists(path):
            os.remove(path)
    else:
        sys.exit(print(f"fake adb: unexpected shell command {line!r}", file=sys.stderr) or 1)
elif cmd == "forward":
    if argv[1:3] == ["tcp:0", "tcp:8022"]:
        print(40123)
    elif argv[1] != "--remove":
        sys.exit(1)
elif cmd == "push":
    local, remote = argv[1], argv[2]
    if not dev.get("storage", True):
        remote += ".elsewhere"
    shutil.copyfile(local, remote)
    print(f"{local}: 1 file pushed, 0 skipped.")
else:
    sys.exit(print(f"fake adb: unexpected command {argv!r}", file=sys.stderr) or 1)
'''

FAKE_SSH = r'''
import json, os, subprocess, sys
state_dir = os.environ["FAKE_ANDROID"]
state = json.load(open(os.path.join(state_dir, "state.json")))
argv = sys.argv[1:]
with open(os.path.join(state_dir, "calls.log"), "a") as log:
    log.write(json.dumps(["ssh", *argv]) + "\n")
i = 0
while i < len(argv) and argv[i].startswith("-"):
    i += 2 if argv[i] in ("-p", "-o", "-i", "-l") else 1
host, remote = argv[i], " ".join(argv[i + 1:])
if state.get("ssh_denied"):
    sys.exit(print(f"{host}: Permission denied (publickey,password).", file=sys.stderr) or 255)
home = os.path.join(state_dir, "home")
env = dict(os.environ, HOME=home, PREFIX=os.path.join(state_dir, "usr"),
           PATH=os.path.join(state_dir, "termux-bin") + os.pathsep + os.environ["PATH"])
sys.exit(subprocess.run(["sh", "-c", remote], cwd=home, env=env).returncode)
'''

FAKE_PERFX = r'''
import json, os, sys
state_dir = os.environ["FAKE_ANDROID"]
with open(os.path.join(state_dir, "calls.log"), "a") as log:
    log.write(json.dumps(["perfx", *sys.argv[1:]]) + "\n")
if sys.argv[1] == "bench":
    print("bench: 3 repetitions", file=sys.stderr)
    if os.environ.get("FAKE_BENCH_FAIL"):
        sys.exit(1)
    print(json.dumps([{"test": "tg128", "avg_ts": 12.5, "args": sys.argv[2:]}], indent=2))
elif sys.argv[1] == "chat":
    sys.exit(int(os.environ.get("FAKE_CHAT_EXIT", "0")))
'''


class Phone:
    """The fake world: devices, Termux home, and the calls made."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.bin = root / "bin"
        self.home = root / "home"
        self.stage = root / "sdcard" / "perfx-push"
        for d in (self.bin, self.home, root / "termux-bin", root / "usr"):
            d.mkdir(parents=True, exist_ok=True)
        for name, source, where in (("adb", FAKE_ADB, self.bin), ("ssh", FAKE_SSH, self.bin),
                                    ("perfx", FAKE_PERFX, root / "termux-bin")):
            path = where / name
            path.write_text(f"#!{sys.executable} -S\n{textwrap.dedent(source)}")
            path.chmod(0o755)
        self.state: dict = {"devices": [], "device": {}}

    def add(self, serial: str, state: str = "device", termux: bool = True, sshd: bool = True,
            storage: bool = True) -> None:
        self.state["devices"].append([serial, state])
        self.state["device"][serial] = {"termux": termux, "sshd": sshd, "storage": storage,
                                        "props": {"ro.product.model": f"Phone {serial}",
                                                  "ro.soc.model": "SM8550", "ro.build.version.release": "14"}}

    def run(self, *args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
        (self.root / "state.json").write_text(json.dumps(self.state))
        environ = {k: v for k, v in os.environ.items() if k not in ("ANDROID_SERIAL", "ADB", "SSH")}
        environ.update(FAKE_ANDROID=str(self.root), PATH=f"{self.bin}{os.pathsep}{os.environ['PATH']}", **(env or {}))
        return subprocess.run([sys.executable, "-S", str(SCRIPT), *args], capture_output=True, text=True,
                              cwd=cwd or self.root, env=environ, timeout=60, check=False)

    def calls(self, prog: str | None = None) -> list[list[str]]:
        log = self.root / "calls.log"
        lines = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        return [c for c in lines if prog is None or c[0] == prog]

    def pushes(self) -> list[list[str]]:
        return [c for c in self.calls("adb") if "push" in c]


@pytest.fixture
def phone(tmp_path: Path) -> Phone:
    return Phone(tmp_path)


def error_of(result: subprocess.CompletedProcess, alone: bool = True) -> str:
    """perfx-adb's error line; `alone`: the only thing on stderr (nothing ran on the phone)."""
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("perfx-adb: error: "), result.stderr
    assert len(lines) == 1 or not alone, result.stderr
    return lines[-1]


def model_file(path: Path, size: int = 1000) -> Path:
    path.write_bytes(bytes((i * 7 + 3) % 256 for i in range(size)))
    return path


def push_args(phone: Phone, model: Path, *extra: str) -> list[str]:
    return ["push", str(model), "--stage", str(phone.stage), "--chunk-mib", str(300 / (1 << 20)), *extra]


# ---- the script itself -------------------------------------------------------------------------------


def test_script_is_executable_python3_stdlib() -> None:
    assert os.access(SCRIPT, os.X_OK)
    assert SCRIPT.read_text().startswith("#!/usr/bin/env python3\n")


# ---- devices -----------------------------------------------------------------------------------------


def test_devices_lists_model_termux_and_sshd(phone: Phone) -> None:
    phone.add("AAA111")
    phone.add("BBB222", termux=True, sshd=False)
    phone.add("CCC333", termux=False)
    phone.add("DDD444", state="unauthorized")
    result = phone.run("devices")
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()[1:]}
    assert result.stdout.splitlines()[0].split() == ["serial", "state", "model", "termux", "sshd"]
    assert rows["AAA111"] == ["AAA111", "device", "Phone", "AAA111", "yes", "yes"]
    assert rows["BBB222"][-2:] == ["yes", "no"]
    assert rows["CCC333"][-2:] == ["no", "-"]
    assert rows["DDD444"] == ["DDD444", "unauthorized", "-", "-", "-"]


def test_devices_with_none_attached(phone: Phone) -> None:
    assert "no device" in error_of(phone.run("devices"))


# ---- errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["bench"], ["chat"]])
def test_no_device(phone: Phone, command: list[str]) -> None:
    message = error_of(phone.run(*command))
    assert "no device" in message and "USB debugging" in message


def test_several_devices_without_serial(phone: Phone) -> None:
    phone.add("AAA111")
    phone.add("BBB222")
    message = error_of(phone.run("bench"))
    assert "several devices attached (AAA111, BBB222)" in message and "-s SERIAL" in message
    assert not phone.calls("ssh")


def test_serial_chooses_among_several(phone: Phone) -> None:
    phone.add("AAA111")
    phone.add("BBB222")
    result = phone.run("-s", "BBB222", "bench", "--out", str(phone.root / "r.json"))
    assert result.returncode == 0, result.stderr
    assert ["adb", "-s", "BBB222", "forward", "tcp:0", "tcp:8022"] in phone.calls("adb")


def test_android_serial_variable(phone: Phone) -> None:
    phone.add("AAA111")
    phone.add("BBB222")
    result = phone.run("bench", "--out", str(phone.root / "r.json"), env={"ANDROID_SERIAL": "AAA111"})
    assert result.returncode == 0, result.stderr
    assert json.loads((phone.root / "r.json").read_text())[0]["android"]["serial"] == "AAA111"


def test_unknown_serial(phone: Phone) -> None:
    phone.add("AAA111")
    assert "device ZZZ is not attached (attached: AAA111)" in error_of(phone.run("-s", "ZZZ", "chat"))


def test_unauthorized_device(phone: Phone) -> None:
    phone.add("AAA111", state="unauthorized")
    assert "unauthorized" in error_of(phone.run("chat"))


def test_termux_not_installed(phone: Phone) -> None:
    phone.add("AAA111", termux=False)
    message = error_of(phone.run("bench"))
    assert "Termux is not installed on AAA111" in message and "F-Droid" in message
    assert not phone.calls("ssh")


def test_sshd_not_running(phone: Phone) -> None:
    phone.add("AAA111", sshd=False)
    message = error_of(phone.run("chat"))
    assert "sshd is not running on AAA111" in message and "`sshd`" in message
    assert not phone.calls("ssh")


def test_adb_missing(phone: Phone) -> None:
    result = phone.run("devices", env={"ADB": "no-such-adb"})
    assert "adb not found" in error_of(result)


def test_ssh_refused(phone: Phone) -> None:
    phone.add("AAA111")
    phone.state["ssh_denied"] = True
    message = error_of(phone.run("bench"), alone=False)
    assert "cannot ssh into Termux on AAA111" in message and "authorized_keys" in message
    assert ["adb", "-s", "AAA111", "forward", "--remove", "tcp:40123"] in phone.calls("adb")


# ---- push --------------------------------------------------------------------------------------------


def test_push_fresh(phone: Phone) -> None:
    phone.add("AAA111")
    model = model_file(phone.root / "tiny.gguf", 1000)
    result = phone.run(*push_args(phone, model))
    assert result.returncode == 0, result.stderr
    assert (phone.home / "models" / "tiny.gguf").read_bytes() == model.read_bytes()
    assert not (phone.home / "models" / "tiny.gguf.part").exists()
    assert len(phone.pushes()) == 4                       # 1000 bytes in chunks of 300
    assert all(c[-1] == f"{phone.stage}/tiny.gguf.chunk" for c in phone.pushes())
    assert not list(phone.stage.iterdir())                # each chunk removed once appended
    assert "use `-m models/tiny.gguf`" in result.stdout
    adb_calls = phone.calls("adb")
    assert ["adb", "-s", "AAA111", "forward", "tcp:0", "tcp:8022"] in adb_calls
    assert ["adb", "-s", "AAA111", "forward", "--remove", "tcp:40123"] in adb_calls
    ssh = phone.calls("ssh")[0]
    assert ssh[1:3] == ["-p", "40123"] and "termux@127.0.0.1" in ssh


def test_push_resumes_by_size(phone: Phone) -> None:
    phone.add("AAA111")
    model = model_file(phone.root / "tiny.gguf", 1000)
    (phone.home / "models").mkdir()
    (phone.home / "models" / "tiny.gguf.part").write_bytes(model.read_bytes()[:650])   # 2 chunks and a bit
    result = phone.run(*push_args(phone, model))
    assert result.returncode == 0, result.stderr
    assert "resuming at" in result.stderr
    assert len(phone.pushes()) == 2                       # bytes 600..1000 only
    assert (phone.home / "models" / "tiny.gguf").read_bytes() == model.read_bytes()


def test_push_skips_when_checksum_matches(phone: Phone) -> None:
    phone.add("AAA111")
    model = model_file(phone.root / "tiny.gguf", 1000)
    (phone.home / "models").mkdir()
    (phone.home / "models" / "tiny.gguf").write_bytes(model.read_bytes())
    result = phone.run(*push_args(phone, model))
    assert result.returncode == 0, result.stderr
    assert "already on AAA111 (size and sha256 match)" in result.stdout
    assert not phone.pushes()


def test_push_replaces_a_different_file_of_the_same_size(phone: Phone) -> None:
    phone.add("AAA111")
    model = model_file(phone.root / "tiny.gguf", 1000)
    (phone.home / "models").mkdir()
    (phone.home / "models" / "tiny.gguf").write_bytes(bytes(1000))
    result = phone.run(*push_args(phone, model))
    assert result.returncode == 0, result.stderr
    assert "differs" in result.stderr and len(phone.pushes()) == 4
    assert (phone.home / "models" / "tiny.gguf").read_bytes() == model.read_bytes()


def test_push_to_another_folder(phone: Phone) -> None:
    phone.add("AAA111")
    model = model_file(phone.root / "tiny.gguf", 100)
    result = phone.run(*push_args(phone, model, "--dest", ".cache/perfx/models/tiny"))
    assert result.returncode == 0, result.stderr
    assert (phone.home / ".cache/perfx/models/tiny/tiny.gguf").read_bytes() == model.read_bytes()


def test_push_without_storage_access(phone: Phone) -> None:
    phone.add("AAA111", storage=False)
    model = model_file(phone.root / "tiny.gguf", 100)
    assert "termux-setup-storage" in error_of(phone.run(*push_args(phone, model)), alone=False)


def test_push_missing_file(phone: Phone) -> None:
    phone.add("AAA111")
    assert "is not a file" in error_of(phone.run("push", str(phone.root / "nope.gguf")))


# ---- bench and chat ----------------------------------------------------------------------------------


def test_bench_brings_the_json_back(phone: Phone) -> None:
    phone.add("AAA111")
    out = phone.root / "results" / "bench.json"
    out.parent.mkdir()
    result = phone.run("bench", "-m", "models/tiny.gguf", "--cooldown", "30", "--out", str(out))
    assert result.returncode == 0, result.stderr
    [record] = json.loads(out.read_text())
    assert record["avg_ts"] == 12.5
    assert record["args"] == ["-m", "models/tiny.gguf", "--cooldown", "30", "-o", "json"]
    assert record["android"] == {"serial": "AAA111", "model": "Phone AAA111", "manufacturer": "", "soc": "SM8550",
                                 "board": "", "android": "14", "sdk": ""}
    assert result.stdout.strip() == str(out)
    assert "bench: 3 repetitions" in result.stderr          # perfx's own messages reach the terminal
    ssh = phone.calls("ssh")[0]
    assert "-T" in ssh and "-t" not in ssh
    assert ssh[-1].endswith("perfx bench -m models/tiny.gguf --cooldown 30 -o json")
    assert "LD_LIBRARY_PATH=\"/vendor/lib64:$PREFIX/lib" in ssh[-1]


def test_bench_default_output_name(phone: Phone) -> None:
    phone.add("AAA111")
    result = phone.run("bench", "--output=json")
    assert result.returncode == 0, result.stderr
    saved = list(phone.root.glob("perfx-bench-AAA111-*.json"))
    assert len(saved) == 1 and result.stdout.strip() == saved[0].name
    assert json.loads(saved[0].read_text())[0]["args"] == ["--output=json"]


def test_bench_other_output_format(phone: Phone) -> None:
    phone.add("AAA111")
    assert "leave out -o csv" in error_of(phone.run("bench", "-o", "csv"))


def test_bench_failure_in_termux(phone: Phone) -> None:
    phone.add("AAA111")
    result = phone.run("bench", env={"FAKE_BENCH_FAIL": "1"})
    assert "perfx bench failed in Termux on AAA111 (exit 1)" in error_of(result, alone=False)


def test_chat_runs_over_ssh_with_a_terminal(phone: Phone) -> None:
    phone.add("AAA111")
    result = phone.run("chat", "-m", "~/models/tiny.gguf", "--system", "Be brief.")
    assert result.returncode == 0, result.stderr
    ssh = phone.calls("ssh")[0]
    assert "-t" in ssh and ssh[ssh.index("-p") + 1] == "40123"
    assert "HostKeyAlias=perfx-adb-AAA111" in ssh
    assert ssh[-1].endswith("perfx chat -m \"$HOME\"/models/tiny.gguf --system 'Be brief.'")
    assert ["perfx", "chat", "-m", str(phone.home / "models/tiny.gguf"), "--system", "Be brief."] in phone.calls("perfx")
    assert ["adb", "-s", "AAA111", "forward", "--remove", "tcp:40123"] in phone.calls("adb")


def test_chat_exit_status_passes_through(phone: Phone) -> None:
    phone.add("AAA111")
    assert phone.run("chat", env={"FAKE_CHAT_EXIT": "3"}).returncode == 3
