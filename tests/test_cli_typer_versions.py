"""The command line loads on typer versions without the help hook perfx uses for flags."""
import subprocess
import sys


def test_cli_imports_without_typers_display_type_hook():
    code = ("import typer.core as c\n"
            "class TyperOption:\n"           # a typer whose options lack display_type_rich
            "    pass\n"
            "c.TyperOption = TyperOption\n"
            "import perfx.cli.main\n"
            "assert not hasattr(TyperOption, 'display_type_rich')\n"
            "print('loaded')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "loaded"
