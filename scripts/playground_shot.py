"""The README's screenshot of the playground: `minigpt serve` on a model, Debian's headless
Chromium driven through the page as a learner would (a prompt, Generate, a banded layer's
head, the alternatives of one token), saved as a PNG.

    python scripts/playground_shot.py --model runs/shakespeare --out docs/playground.png

`chromium()` is also how tests/serve/test_playground.py starts the browser.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


def chromium(profile: Path, size: str = "1400,1000"):
    """Debian's Chromium, headless, through Debian's chromedriver (nothing is downloaded); the
    flags keep it off the network, which this machine's closed network would refuse anyway."""
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--window-size={size}", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))


def main(argv: list[str] | None = None) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from benchmarks.bench_serve import _Server
    from minigpt.model_dir import resolve_model_dir

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", type=Path, default=Path("docs/playground.png"))
    parser.add_argument("--prompt", default="ROMEO:\n")
    parser.add_argument("--layer", type=int, default=1)
    parser.add_argument("--head", type=int, default=2)
    args = parser.parse_args(argv)
    server = _Server(resolve_model_dir(args.model), 2, name=Path(args.model).resolve().name)
    with tempfile.TemporaryDirectory() as profile:
        driver = chromium(Path(profile), "1500,1050")
        try:
            driver.get(f"http://127.0.0.1:{server.port}/")
            WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "layer").find_elements(By.TAG_NAME, "option"))
            for name, value in (("prompt", args.prompt), ("temperature", "0.8"), ("seed", "1"), ("max_tokens", "40")):
                element = driver.find_element(By.ID, name)
                element.clear()
                element.send_keys(value)
            driver.find_element(By.ID, "generate").click()
            WebDriverWait(driver, 60).until(lambda d: d.find_element(By.ID, "generate").is_enabled()
                                            and d.find_elements(By.CSS_SELECTOR, "#attention td.cell"))
            Select(driver.find_element(By.ID, "layer")).select_by_value(str(args.layer))
            WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "attention").get_attribute("data-layer")
                                            == str(args.layer))
            Select(driver.find_element(By.ID, "head")).select_by_value(str(args.head))
            tokens = driver.find_elements(By.CSS_SELECTOR, "#output .generated")
            ActionChains(driver).move_to_element(tokens[len(tokens) // 3]).perform()
            args.out.parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(args.out))
        finally:
            driver.quit()
            server.close()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
