"""Tests of the drawing page that the local model server answers at / and /draw, in a real headless Chromium.

One server (the small test model of conftest.py, served as --model_name=digits to show that the page takes the
name from the server) and one browser for the module. The browser draws digits of tests/drawn_digits.json on the
pad with mouse, pen and touch pointers, uses the buttons, the keyboard and the file input, and at the end sees the
server stopped. Without Chromium and chromedriver these tests skip with the reason; with CI=true they fail instead.

    python3 -m pytest -q tests/test_draw_page.py
"""
import base64
import io
import os
import re
import signal

import numpy as np
import pytest
import requests
from PIL import Image

import drawn_digits
import model_server

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_NAME = 'digits'
# Drawings of tests/drawn_digits.json the page reads here with each kind of pointer: a 4 in two strokes, a 5 and a
# 3 in one. The small test model reads 0.91-0.95 of all 120 drawings; bench/draw_bench.py measures the demo's model
# on all of them.
DRAWINGS = {'mouse': 48, 'pen': 61, 'touch': 40}


@pytest.fixture(scope='module')
def server(model_base_dir, tmp_path_factory):
    log_path = tmp_path_factory.mktemp('draw') / 'server.log'
    port = model_server.free_port()
    with open(log_path, 'wb') as log_file:
        process = model_server.launch(model_base_dir, port, [f'--model_name={MODEL_NAME}'], log_file)
    try:
        yield {'url': f'http://127.0.0.1:{port}', 'process': process, 'log': log_path}
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=30)


@pytest.fixture(scope='module')
def browser():
    # Imported here so that a machine without selenium reports it as the skip reason.
    try:
        import page_driver

        page_driver.find_browser()
    except (ImportError, LookupError) as error:
        reason = f'no browser to test the drawing page: {error}'
        if os.environ.get('CI') == 'true':
            pytest.fail(reason)
        pytest.skip(reason)
    browser = page_driver.Browser()
    try:
        yield browser
    finally:
        browser.close()


@pytest.fixture(scope='module')
def drawings():
    return drawn_digits.load_drawings()


def predict_png(server, png):
    """predict_image's answer for PNG bytes, straight from the server's REST API."""
    reply = requests.post(f'{server["url"]}/v1/models/{MODEL_NAME}:predict', timeout=30, json={
        'signature_name': 'predict_image', 'instances': [{'b64': base64.b64encode(png).decode('ascii')}]})
    assert reply.status_code == 200, reply.text
    return reply.json()['predictions'][0]


def test_drawn_digit_set_regenerates_and_covers_every_digit(drawings):
    with open(drawn_digits.DRAWINGS_PATH) as file:
        assert file.read() == drawn_digits.format_drawings(drawn_digits.make_drawings())
    assert len(drawings) >= 100
    assert sorted({drawing['digit'] for drawing in drawings}) == list(range(10))
    points = np.concatenate([np.array(stroke) for drawing in drawings for stroke in drawing['strokes']])
    assert points.min() >= 0 and points.max() <= drawn_digits.PAD_SIZE
    heights = [np.ptp(np.concatenate(drawing['strokes'])[:, 1]) for drawing in drawings]
    assert min(heights) < 0.35 * drawn_digits.PAD_SIZE and max(heights) > 0.8 * drawn_digits.PAD_SIZE


def test_page_is_served_at_paths_tf_serving_does_not_use(server):
    pages = [requests.get(server['url'] + path, timeout=10) for path in ('/', '/draw', '/draw?from=docs')]
    for page in pages:
        assert page.status_code == 200
        assert page.headers['Content-Type'] == 'text/html; charset=utf-8'
        assert "connect-src 'self'" in page.headers['Content-Security-Policy']
    text = pages[0].text
    assert text == pages[1].text
    for element_id in ('pad', 'predict', 'clear', 'file', 'digit', 'probabilities', 'version'):
        assert f'id="{element_id}"' in text
    # The model name comes from the server's --model_name; the page loads nothing from elsewhere.
    assert f'<meta name="model-name" content="{MODEL_NAME}">' in text and '{{' not in text
    assert not re.search(r'(src|href)="(https?:)?//', text) and 'url(' not in text
    # TF Serving's API is unchanged around it.
    assert requests.get(f'{server["url"]}/v1/models/{MODEL_NAME}', timeout=10).status_code == 200
    assert requests.post(server['url'] + '/', timeout=10, data=b'{}').status_code == 400
    assert requests.get(server['url'] + '/drawing', timeout=10).status_code == 400


def test_page_reads_digits_drawn_with_mouse_pen_and_touch(browser, server, drawings, tmp_path):
    browser.open(server['url'] + '/')
    assert browser.text('version') == f'Serving model {MODEL_NAME}, version 1.'
    for pointer, index in DRAWINGS.items():
        browser.click('clear')
        assert browser.text('digit') == '?'
        assert browser.draw(drawings[index]['strokes'], pointer=pointer) == 'done', browser.text('message')
        digit, probabilities = browser.answer()
        assert digit == str(drawings[index]['digit']), f'{pointer} drawing {index}'
        assert browser.text('version') == f'Answered by model {MODEL_NAME}, version 1.'
        # The page shows what the server answers for the very PNG the page sends.
        expected = predict_png(server, browser.pad_png())
        assert digit == str(expected['digit'])
        np.testing.assert_allclose(probabilities, expected['probabilities'], atol=0.0006)
    browser.screenshot(str(tmp_path / 'draw.png'))
    assert Image.open(tmp_path / 'draw.png').size[0] >= 800


def test_buttons_and_keyboard(browser, server, drawings):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    browser.open(server['url'] + '/draw')
    # Keyboard only: Tab reaches the pad first, then Predict and Clear, each with a visible focus ring.
    ActionChains(browser.driver).send_keys(Keys.TAB).perform()
    assert browser.driver.switch_to.active_element.get_attribute('id') == 'pad'
    browser.click('predict')
    assert browser.text('summary') == 'The pad is empty: draw a digit first.'
    drawing = drawings[DRAWINGS['mouse']]
    browser.draw(drawing['strokes'])
    browser.click('clear')
    assert browser.state() == 'idle' and browser.text('digit') == '?'
    assert Image.open(io.BytesIO(browser.pad_png())).convert('L').getextrema() == (255, 255)
    browser.draw(drawing['strokes'])
    browser.element('pad').send_keys(Keys.DELETE)
    assert browser.state() == 'idle'
    browser.draw(drawing['strokes'])
    browser.element('pad').send_keys(Keys.ENTER)
    browser.wait_until(lambda: browser.state() == 'done')
    assert browser.text('digit') == str(drawing['digit'])
    browser.driver.switch_to.active_element.send_keys(Keys.TAB)
    predict_button = browser.driver.switch_to.active_element
    assert predict_button.get_attribute('id') == 'predict'
    assert predict_button.value_of_css_property('outline-style') == 'solid'
    predict_button.send_keys(Keys.TAB)
    assert browser.driver.switch_to.active_element.get_attribute('id') == 'clear'
    browser.driver.switch_to.active_element.send_keys(Keys.ENTER)
    assert browser.state() == 'idle'


def test_file_input_sends_a_photo_and_shows_the_servers_error(browser, server, drawings, tmp_path):
    browser.open(server['url'] + '/')
    # A scan: one of the drawings, thin dark ink on gray paper, as JPEG.
    drawing = drawings[DRAWINGS['pen']]
    scan = Image.open(io.BytesIO(drawn_digits.render_png(drawing['strokes'], 6))).point(lambda level: level * 0.8)
    scan.convert('RGB').save(tmp_path / 'scan.jpg', quality=90)
    browser.element('file').send_keys(str(tmp_path / 'scan.jpg'))
    browser.wait_until(lambda: browser.state() in ('done', 'error'))
    assert browser.text('digit') == str(drawing['digit']), browser.text('message')
    # A file that is no image at all: the page shows the server's error.
    (tmp_path / 'broken.png').write_bytes(b'not a PNG at all')
    browser.element('file').send_keys(str(tmp_path / 'broken.png'))
    browser.wait_until(lambda: browser.state() == 'error')
    assert browser.text('message').startswith('The model server answered an error (HTTP 400): ')
    assert browser.text('summary') == 'No answer: see the message below.'


def test_page_says_when_the_server_is_gone(browser, server, drawings):
    """Last in the module: it stops the server."""
    browser.open(server['url'] + '/')
    server['process'].send_signal(signal.SIGTERM)
    assert server['process'].wait(timeout=30) == 0
    assert browser.draw(drawings[DRAWINGS['mouse']]['strokes']) == 'error'
    assert browser.text('message') == (f'Cannot reach the model server at {server["url"]}. Is it still running? '
                                       'Start it with: python3 mnist_model/model_server.py')
    assert 'Traceback' not in server['log'].read_text()
