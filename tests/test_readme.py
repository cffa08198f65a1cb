"""The README's Python example runs as written."""

from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_example_runs(capsys):
    text = README.read_text()
    start = text.index("```python\n") + len("```python\n")
    code = text[start : text.index("```", start)]
    exec(compile(code, "README.md", "exec"), {})
    err = float(capsys.readouterr().out.strip().splitlines()[-1])
    assert err < 1e-4  # float32 kernel vs the float64 oracle
