"""`python -m minigpt ...` (also what `torchrun -m minigpt` runs)."""
from minigpt.cli import main

main()
