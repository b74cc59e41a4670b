"""``python -m rumor`` runs the command line."""

from rumor.cli import main

main()
