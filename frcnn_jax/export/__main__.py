"""`python -m frcnn_jax.export`: see `frcnn_jax.export.writer`."""

from absl import app

from frcnn_jax.config import flags as cli_flags
from frcnn_jax.export import writer

if __name__ == "__main__":
  writer.define_flags()
  app.run(writer.main, flags_parser=cli_flags.parse_flags)
