import pytest

from tests.graph.builders import save_syllable_bert


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    return save_syllable_bert(tmp_path_factory.mktemp("tiny_bert"))
