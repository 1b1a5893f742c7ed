import pytest
import yaml

from tests.conftest import ROOT
from vqflow.config import ParamsError, ServeSettings


def test_serve_settings_are_params_over_defaults_under_the_environment():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    settings = ServeSettings.load(params, environ={})
    assert {k: getattr(settings, k) for k in params["serve"]} == params["serve"]  # every key of params is read

    changed = ServeSettings.load(
        {"serve": {"max_batch_size": 4}}, environ={"VQFLOW_DEVICE": "cpu", "VQFLOW_MAX_LATENCY_MS": "2.5"}
    )
    assert (changed.max_batch_size, changed.device, changed.max_latency_ms) == (4, "cpu", 2.5)
    assert changed.max_pixels == ServeSettings().max_pixels


def test_bad_serve_settings_name_the_field():
    with pytest.raises(ParamsError, match="serve.max_batch"):
        ServeSettings.load({"serve": {"max_batch": 4}}, environ={})
    with pytest.raises(ParamsError, match="VQFLOW_MAX_BATCH_SIZE='many': expected int"):
        ServeSettings.load({}, environ={"VQFLOW_MAX_BATCH_SIZE": "many"})
    with pytest.raises(ParamsError, match="serve.max_pixels"):
        ServeSettings.load({"serve": {"max_pixels": "lots"}}, environ={})
