"""Drive the drawing page (mnist_model/draw.html) in headless Chromium with Selenium, as a person would.

Used by tests/test_draw_page.py and bench/draw_bench.py: start Debian's chromium through its chromedriver, draw
strokes on the pad with pointer actions (mouse, pen or touch), and read the answer the page shows.
"""
import os
import shutil
import tempfile
import time

# Flags for a sandboxed, offline machine: no GPU, no shared-memory limits, and none of Chromium's own background
# connections (updates, sync, safe browsing), which a closed network refuses.
CHROMIUM_FLAGS = ('--headless=new', '--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage',
                  '--disable-background-networking', '--disable-component-update', '--disable-sync',
                  '--no-first-run', '--window-size=900,800', '--force-device-scale-factor=1')
ANSWER_TIMEOUT_SECONDS = 30


def find_browser():
    """(chromium path, chromedriver path), or raise LookupError with a one-line reason."""
    import selenium  # noqa: F401 - only to fail with the reason below when it is missing

    chromium = shutil.which('chromium') or shutil.which('chromium-browser')
    chromedriver = shutil.which('chromedriver')
    if not chromium or not chromedriver:
        missing = ' and '.join(name for name, path in (('chromium', chromium), ('chromedriver', chromedriver))
                               if not path)
        raise LookupError(f'no {missing} on PATH (Debian: apt-get install chromium chromium-driver)')
    return chromium, chromedriver


class Browser:
    """One headless Chromium with a fresh profile, removed again by close()."""

    def __init__(self):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        chromium, chromedriver = find_browser()
        self.profile = tempfile.mkdtemp(prefix='mnist-chromium-')
        options = webdriver.ChromeOptions()
        options.binary_location = chromium
        for flag in CHROMIUM_FLAGS:
            options.add_argument(flag)
        options.add_argument(f'--user-data-dir={self.profile}')
        # The driver's path is given, so Selenium never runs its manager, which would look for drivers online.
        try:
            self.driver = webdriver.Chrome(options=options, service=Service(executable_path=chromedriver))
        except BaseException:
            shutil.rmtree(self.profile, ignore_errors=True)
            raise

    def open(self, url):
        self.driver.get(url)
        self.wait_until(lambda: self.state() in ('idle', 'done', 'error')
                        and not self.text('version').startswith('Asking'))

    def element(self, element_id):
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.ID, element_id)

    def text(self, element_id):
        return self.element(element_id).text

    def state(self):
        return self.driver.execute_script('return document.body.dataset.state')

    def wait_until(self, condition, timeout=ANSWER_TIMEOUT_SECONDS):
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError(f'the page did not get there in {timeout} s (state {self.state()!r})')
            time.sleep(0.02)

    def draw(self, strokes, pad_size=280, pointer='mouse'):
        """Draw strokes of [x, y] pad points on the page's pad with one pointer of the kind given (mouse, pen or
        touch), then wait for the answer that lifting the pen asks for. Returns the page's state, done or error."""
        from selenium.webdriver.common.actions import interaction
        from selenium.webdriver.common.actions.action_builder import ActionBuilder
        from selenium.webdriver.common.actions.pointer_input import PointerInput

        pad = self.element('pad')
        # Pointer offsets are CSS pixels from the pad's centre; the pad's drawing surface is pad_size px square.
        width = pad.size['width']
        scale = width / pad_size
        kinds = {'mouse': interaction.POINTER_MOUSE, 'pen': interaction.POINTER_PEN,
                 'touch': interaction.POINTER_TOUCH}
        actions = ActionBuilder(self.driver, mouse=PointerInput(kinds[pointer], pointer), duration=0)

        def move(x, y):
            actions.pointer_action.move_to(pad, round((x - pad_size / 2) * scale), round((y - pad_size / 2) * scale))

        for stroke in strokes:
            move(*stroke[0])
            actions.pointer_action.pointer_down()
            for x, y in stroke[1:]:
                move(x, y)
            actions.pointer_action.pointer_up()
        actions.perform()
        self.wait_until(lambda: self.state() in ('done', 'error'))
        return self.state()

    def click(self, element_id):
        self.element(element_id).click()

    def answer(self):
        """The digit the page shows and its probabilities as numbers."""
        values = [item.text.split()[-1] for item in self.element('probabilities').find_elements('css selector', 'li')]
        return self.text('digit'), [float(value.rstrip('%')) / 100 if value.endswith('%') else None
                                    for value in values]

    def pad_png(self):
        """The pad's drawing as PNG bytes, as the page sends it."""
        import base64

        data_url = self.driver.execute_script("return document.getElementById('pad').toDataURL('image/png')")
        return base64.b64decode(data_url.split(',', 1)[1])

    def screenshot(self, path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.driver.save_screenshot(path)

    def close(self):
        try:
            self.driver.quit()
        finally:
            shutil.rmtree(self.profile, ignore_errors=True)
