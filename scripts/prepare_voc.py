"""Builds the tfds `voc/2007` and `voc/2012` datasets in array_record format.

frcnn_jax reads them with `tfds.data_source` (random access, no TensorFlow at training time);
building them runs tfds' own `voc` builder, which needs TensorFlow (the `prepare` extra:
`pip install -e ".[prepare]"`).

Usage:
  # download the original tars (internet needed; ~2.9 GB for 2007, ~3.8 GB for 2012):
  python scripts/prepare_voc.py --data_dir ~/tensorflow_datasets --years 2007 2012
  # or build from tars you already have (no network), named as published:
  #   VOCtrainval_06-Nov-2007.tar, VOCtest_06-Nov-2007.tar, VOCtrainval_11-May-2012.tar
  #   (VOC2012test.tar is optional: VOC2012 test has no public annotations)
  python scripts/prepare_voc.py --data_dir ~/tensorflow_datasets --tar_dir ~/Downloads

Then train with `--config.data.name=voc_tfds --config.data.voc_tfds.data_dir=<data_dir>`.
"""

import argparse
import os
import pathlib
import sys
import tempfile


def local_tar_builder():
  """tfds' `voc` builder class reading the original tars (imported here: `--help` and the
  argument check need no TensorFlow)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  # pylint: disable-next=g-import-not-at-top
  from tensorflow_datasets.object_detection import voc as tfds_voc

  class LocalTarVoc(tfds_voc.Voc, skip_registration=True):
    """tfds' `voc` builder reading the original tar files from a local folder.

    Only `_split_generators` differs from tfds' builder: the tars are extracted from `tar_dir`
    instead of downloaded (so no checksum of the published files is required, and a user's own
    VOC-format tars work too). Examples, features and the dataset name/version are tfds' own, so
    `tfds.data_source("voc/<year>")` reads the result like a downloaded build.
    """

    name = "voc"

    def __init__(self, *, tar_dir: str | os.PathLike, **kwargs):
      self._tar_dir = pathlib.Path(tar_dir)
      super().__init__(**kwargs)

    def _split_generators(self, dl_manager):
      tars = {split: self._tar_dir / filename
              for split, filename in self.builder_config.filenames.items()}
      required = ["trainval"] + (["test"] if self.builder_config.has_test_annotations else [])
      missing = [str(tars[split]) for split in required if not tars[split].is_file()]
      if missing:
        raise FileNotFoundError(f"VOC{self.builder_config.year}: missing {', '.join(missing)}")
      paths = dl_manager.extract({split: tars[split] for split in required})
      generators = [
          tfds.core.SplitGenerator(name=tfds.Split.TRAIN,
                                   gen_kwargs=dict(data_path=paths["trainval"],
                                                   set_name="train")),
          tfds.core.SplitGenerator(name=tfds.Split.VALIDATION,
                                   gen_kwargs=dict(data_path=paths["trainval"],
                                                   set_name="val")),
      ]
      if "test" in paths:
        generators.append(tfds.core.SplitGenerator(
            name=tfds.Split.TEST, gen_kwargs=dict(data_path=paths["test"], set_name="test")))
      return generators

  return LocalTarVoc


def prepare(data_dir: str, years: list[str], tar_dir: str | None = None) -> list[str]:
  """Builds `voc/<year>` for each year into data_dir; returns the dataset folders.

  Args:
    data_dir: the tfds data_dir (datasets land in <data_dir>/voc/<year>/<version>).
    years: "2007" and/or "2012".
    tar_dir: folder with the original VOC tars; None downloads them.
  """
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    builder_class = local_tar_builder()
  except ImportError as e:
    sys.exit(f"error: building the tfds datasets needs TensorFlow ({e}): "
             'pip install -e ".[prepare]"')
  built = []
  data_dir = os.path.expanduser(data_dir)
  os.makedirs(data_dir, exist_ok=True)
  for year in years:
    with tempfile.TemporaryDirectory(dir=data_dir, prefix=".extract_") as extract_dir:
      config = tfds.download.DownloadConfig(extract_dir=extract_dir, try_download_gcs=False)
      if tar_dir is None:
        builder = tfds.builder(f"voc/{year}", data_dir=data_dir, file_format="array_record")
      else:
        builder = builder_class(tar_dir=os.path.expanduser(tar_dir), config=year,
                                data_dir=data_dir, file_format="array_record")
      builder.download_and_prepare(download_config=config)
    splits = ", ".join(f"{k}: {v.num_examples}" for k, v in sorted(builder.info.splits.items()))
    print(f"voc/{year} -> {builder.data_dir} ({splits})")
    built.append(str(builder.data_dir))
  return built


def parse_args(argv: list[str]) -> argparse.Namespace:
  """The command line: --data_dir (required), --years, --tar_dir."""
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--data_dir", required=True, help="tfds data_dir to build into")
  parser.add_argument("--years", nargs="+", default=["2007", "2012"], choices=["2007", "2012"])
  parser.add_argument("--tar_dir", default=None,
                      help="folder with the original VOC tars (default: download them)")
  return parser.parse_args(argv)


def main(argv: list[str]) -> None:
  args = parse_args(argv)
  prepare(args.data_dir, args.years, args.tar_dir)


if __name__ == "__main__":
  main(sys.argv[1:])
