import os

import pytest
import torch
import yaml
from monai.bundle import ConfigParser
from tiny import TINY_DETECTOR

from scripts.checkpoint import detector_record, save_detector

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def single_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine OpenMP contention slows them 10x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _load_preset(name: str, **overrides):
    """train.yaml + a preset, merged as `python -m monai.bundle run --config_file "[...]"` merges them."""
    files = [os.path.join(ROOT, "configs", f) for f in ("train.yaml", name)]
    parser = ConfigParser(ConfigParser.load_config_files(files))
    parser.update({"bundle_root": ROOT, **overrides})
    with open(files[1]) as f:
        return parser, yaml.safe_load(f)


@pytest.fixture
def load_preset():
    return _load_preset


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """A random tiny detector, written the way ILTM training writes model.pt (weights and settings record)."""
    path = str(tmp_path_factory.mktemp("bundle") / "models" / "model.pt")
    os.makedirs(os.path.dirname(path))
    torch.manual_seed(0)
    parser = ConfigParser()
    parser.read_config(os.path.join(ROOT, "configs", "inference.yaml"))
    parser.update(TINY_DETECTOR)
    detector = parser.get_parsed_content("network_def")
    save_detector(detector, detector_record(detector, parser.get_parsed_content("detector_settings")), path)
    return path
