"""``python -m calozoo``: the same as the ``calozoo`` command (for Ray jobs, whose PATH may lack it)."""

from calozoo.cli import main

main()
