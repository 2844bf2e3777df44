"""The command line loads on typer versions without the help hook perfx uses for flags."""
import subprocess
import sys


def test_cli_loads_without_typers_display_type_hook():
    code = ("import typer.core as c\n"
            "for k in c.TyperOption.__mro__:\n"
            "    if 'display_type_rich' in vars(k):\n"
            "        delattr(k, 'display_type_rich')\n"
            "import sys; sys.argv = ['perfx', '--help']\n"
            "from perfx.cli.main import app\n"
            "app()\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert "chat" in r.stdout
