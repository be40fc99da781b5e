"""The playground at `/` of `minigpt serve`, in a real headless Chromium (Debian's, driven by
Selenium through Debian's chromedriver; nothing downloads a browser of its own).

The page's sampled text is checked against `generate`, its probability popover against
the order of the top alternatives, and its attention heatmap, cell by cell, against the
`math` backend's attention probabilities of a model loaded here from the same folder."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from minigpt import GPT
from minigpt.generate import generate_text
from minigpt.tokenizer import load_tokenizer

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[serve]'")
pytest.importorskip("selenium.webdriver", reason="selenium is not installed: pip install -e '.[test]'")

from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

from tests.serve.test_server import Server, _model_folder  # noqa: E402

from scripts.playground_shot import CHROMEDRIVER, CHROMIUM, chromium  # noqa: E402

if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
    pytest.skip("Debian's chromium and chromium-driver are not installed (apt-get install chromium chromium-driver; "
                ".ci/run installs them)", allow_module_level=True)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    folder = _model_folder(tmp_path_factory.mktemp("playground") / "tiny")
    server = Server(folder)
    driver = chromium(tmp_path_factory.mktemp("chromium"))
    driver.get(server.url + "/")
    try:
        WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "model-name").text == "tiny"
                                        and len(Select(d.find_element(By.ID, "layer")).options) == 2)
        model = GPT.from_pretrained(folder).eval()
        yield driver, model, load_tokenizer(folder), tmp_path_factory.mktemp("shots")
    finally:
        driver.quit()
        server.close()


def _set(driver, element_id: str, value: str) -> None:
    element = driver.find_element(By.ID, element_id)
    element.clear()
    element.send_keys(value)


def _generate(driver, prompt: str, max_tokens: int, **fields: str) -> list:
    _set(driver, "prompt", prompt)
    _set(driver, "temperature", "0")
    _set(driver, "max_tokens", str(max_tokens))
    for name, value in fields.items():
        _set(driver, name, value)
    driver.find_element(By.ID, "generate").click()
    WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "generate").is_enabled()
                                    and d.find_elements(By.CSS_SELECTOR, "#output .token"))
    return driver.find_elements(By.CSS_SELECTOR, "#output .generated")


def _text(spans) -> str:
    return "".join(s.get_attribute("textContent") for s in spans)


def test_the_page_samples_what_generate_gives_with_each_tokens_alternatives(site):
    driver, model, tokenizer, shots = site
    spans = _generate(driver, "the cat", 20)
    assert _text(spans) == generate_text(model, tokenizer, "the cat", 20, temperature=0)[0]
    prompt_tokens = driver.find_elements(By.CSS_SELECTOR, "#output .prompt-token")
    assert _text(prompt_tokens) == "the cat"
    ActionChains(driver).move_to_element(spans[0]).perform()
    WebDriverWait(driver, 10).until(lambda d: d.find_element(By.ID, "popover").is_displayed())
    items = driver.find_elements(By.CSS_SELECTOR, "#popover .alternative")
    probs = [float(i.get_attribute("data-prob")) for i in items]
    assert len(items) == 10 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    assert items[0].get_attribute("data-token") == spans[0].get_attribute("textContent")  # greedy: the top one
    with torch.no_grad():  # the popover's probabilities are the model's for that position
        ids = tokenizer.encode("the cat")
        want = torch.softmax(model(torch.tensor([ids])).logits[0, -1].double(), dim=-1).topk(10).values.tolist()
    assert probs == pytest.approx(want, abs=1e-5)
    driver.save_screenshot(str(shots / "generated.png"))


def test_clicking_an_alternative_continues_from_it(site):
    driver, model, tokenizer, _ = site
    spans = _generate(driver, "a b", 6)
    ActionChains(driver).move_to_element(spans[2]).perform()
    WebDriverWait(driver, 10).until(lambda d: d.find_element(By.ID, "popover").is_displayed())
    second = driver.find_elements(By.CSS_SELECTOR, "#popover .alternative")[1]
    chosen = second.get_attribute("data-token")
    before = "a b" + _text(spans[:2])
    second.click()
    WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "prompt").get_attribute("value") == before + chosen
                                    and d.find_element(By.ID, "generate").is_enabled()
                                    and d.find_elements(By.CSS_SELECTOR, "#output .generated"))
    spans = driver.find_elements(By.CSS_SELECTOR, "#output .generated")
    assert _text(spans) == generate_text(model, tokenizer, before + chosen, 6, temperature=0)[0]


@pytest.mark.parametrize("layer, head", [(0, 1), (1, 0), (1, 1)])
def test_the_heatmap_is_the_math_backends_attention_and_banded_layers_are_banded(site, layer, head):
    driver, model, tokenizer, shots = site
    spans = _generate(driver, "hello there, friend", 12)
    text = "hello there, friend" + _text(spans)
    Select(driver.find_element(By.ID, "layer")).select_by_value(str(layer))  # inspects again when it changes
    WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "attention").get_attribute("data-layer") == str(layer)
                                    and len(d.find_elements(By.CSS_SELECTOR, "#attention tr")) == len(text) + 1)
    Select(driver.find_element(By.ID, "head")).select_by_value(str(head))
    WebDriverWait(driver, 10).until(lambda d: d.find_element(By.ID, "attention").get_attribute("data-head") == str(head))
    rows = driver.execute_script(
        "return Array.from(document.querySelectorAll('#attention tr')).slice(1).map("
        "r => Array.from(r.querySelectorAll('td.cell')).map(c => Number(c.dataset.value)))")
    ids = tokenizer.encode(text)
    model.set_backend("math")  # the reference: the explicit masked softmax
    try:
        with torch.no_grad():
            want = model(torch.tensor([ids]), output_attentions=True).attentions[layer][0, head].double()
    finally:
        model.set_backend("sdpa")
    got = torch.tensor(rows, dtype=torch.float64)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)  # the page gets 5 decimals
    window = model.config.layer_window(layer)
    i = torch.arange(len(ids))
    outside = (i[None, :] > i[:, None]) | ((i[:, None] - i[None, :] >= window) if window else False)
    assert (got[outside] == 0).all() and got.sum(dim=1).sub(1).abs().max() < 1e-3  # each row a distribution
    if window:
        assert driver.find_element(By.ID, "layer-kind").text == f"layer {layer}: banded w={window}"
        driver.save_screenshot(str(shots / f"banded-{layer}-{head}.png"))


def test_the_model_card_and_the_lens(site):
    driver, model, _, _ = site
    from selenium.common.exceptions import StaleElementReferenceException

    _set(driver, "prompt", "the cat sat")  # the inside view reads the prompt when nothing was generated yet
    driver.find_element(By.ID, "inside-button").click()

    def shown(d):  # the card and the lens's last row, once the lens has every row; the page may
        rows = d.find_elements(By.CSS_SELECTOR, "#lens tr")  # redraw them meanwhile (stale: read again)
        return len(rows) == model.config.n_layer + 2 and (d.find_element(By.ID, "card").text, rows[-1].text)

    card, last = WebDriverWait(driver, 30, ignored_exceptions=(StaleElementReferenceException,)).until(shown)
    assert f"{model.num_params():,}" in card and "dense, banded w=8" in card and "64" in card
    assert last.startswith("after block 1 = output")


def test_errors_are_shown_on_the_page(site):
    driver, _, _, _ = site
    _set(driver, "prompt", "a" * 70)
    driver.find_element(By.ID, "generate").click()
    WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "error").is_displayed())
    assert "maximum context length is 64" in driver.find_element(By.ID, "error").text
    _set(driver, "prompt", "the cat")
    _set(driver, "temperature", "5")
    driver.find_element(By.ID, "generate").click()
    WebDriverWait(driver, 30).until(lambda d: "temperature" in d.find_element(By.ID, "error").text)


def test_a_server_that_went_away_is_said_on_the_page(tmp_path):
    server = Server(_model_folder(tmp_path / "gone"))
    driver = chromium(tmp_path / "profile")
    try:
        driver.get(server.url + "/")
        WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "model-name").text == "gone")
        server.close()
        _set(driver, "prompt", "the cat")
        driver.find_element(By.ID, "generate").click()
        WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "error").is_displayed())
        assert "the server is not answering" in driver.find_element(By.ID, "error").text
    finally:
        driver.quit()
        server.close()
