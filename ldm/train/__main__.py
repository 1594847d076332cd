"""`python -m ldm.train ARGS`: a training run with main_dream_booth.py's command line (`--help` lists it)."""
from ldm.train import main
from ldm.util.logs import setup_logging

if __name__ == "__main__":
    setup_logging()
    main(prog="python -m ldm.train")
