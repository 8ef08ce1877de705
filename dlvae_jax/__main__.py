import sys

from dlvae_jax.cli import main

sys.exit(main())
