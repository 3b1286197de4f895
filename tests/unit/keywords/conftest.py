"""The real Korean model and speech rendered for it, loaded once per session for every speech test here."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from keywords.speech import SpeechModel
from tests.unit.keywords.test_speech import korean_model_path, render_speech


@pytest.fixture(scope="session")
def model() -> Iterator[SpeechModel]:
    loaded = SpeechModel.load(korean_model_path())
    yield loaded
    loaded.close()


@pytest.fixture(scope="session")
def speech(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return render_speech(tmp_path_factory.mktemp("speech"))
