"""Read a demo report (run_demo.py's report.html) in headless Chromium at a screen's width, as a person would, and
list what would trip them: a word broken across two lines, a page wider than the screen, a table or figure running
out of the page. Used by tests/test_run_demo.py; from the command line it checks 1280 and 1920 px and can save a
screenshot of the report's top for docs/:

    python3 tests/report_page.py demo-report/20261201-120000/report.html --screenshot docs/demo-report.png
"""
import argparse
import base64
import io
import os
import pathlib
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import page_driver  # noqa: E402 - found through the path set just above

WIDTHS = (1280, 1920)
# Every run of non-space characters in a text node is a word; one whose pieces sit on more than one line was broken
# inside. Scroll containers (a long command in its cell) keep their words on one line and are not an overflow.
LAYOUT_SCRIPT = r'''
const problems = [];
const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
let words = 0;
while (walker.nextNode()) {
  const node = walker.currentNode;
  if (node.parentElement.closest('style, script')) continue;
  const pattern = /\S+/g;
  let match;
  while ((match = pattern.exec(node.textContent))) {
    words += 1;
    const range = document.createRange();
    range.setStart(node, match.index);
    range.setEnd(node, match.index + match[0].length);
    const lines = new Set(Array.from(range.getClientRects()).filter(rect => rect.width > 0)
                          .map(rect => Math.round(rect.bottom)));
    if (lines.size > 1) problems.push('word broken across lines: ' + match[0]);
  }
}
const page = document.documentElement;
if (page.scrollWidth > window.innerWidth) {
  problems.push('page wider than the screen: ' + page.scrollWidth + ' px > ' + window.innerWidth + ' px');
}
const body = document.body.getBoundingClientRect();
for (const element of document.querySelectorAll('table, img, .card, div.command')) {
  if (element.closest('div.scroll')) continue;
  const box = element.getBoundingClientRect();
  if (box.right > body.right + 1) {
    problems.push(element.tagName.toLowerCase() + '.' + element.className + ' runs out of the page by ' +
                  Math.round(box.right - body.right) + ' px');
  }
}
return {problems: problems, words: words, height: page.scrollHeight};
'''


def open_report(browser, path, width, height=1000):
    """Show the report file in a viewport width x height CSS pixels."""
    browser.driver.execute_cdp_cmd('Emulation.setDeviceMetricsOverride',
                                   {'width': width, 'height': height, 'deviceScaleFactor': 1, 'mobile': False})
    browser.driver.get(pathlib.Path(os.path.abspath(path)).as_uri())


def layout(browser):
    """{'problems': [one line each], 'words': words checked, 'height': page height in px} of the page shown."""
    return browser.driver.execute_script(LAYOUT_SCRIPT)


def save_screenshot(browser, path, width, height):
    """The top width x height CSS pixels of the page shown, as a PNG file of 256 colours (a third of the bytes)."""
    from PIL import Image

    capture = browser.driver.execute_cdp_cmd('Page.captureScreenshot', {
        'format': 'png', 'captureBeyondViewport': True,
        'clip': {'x': 0, 'y': 0, 'width': width, 'height': height, 'scale': 1}})
    picture = Image.open(io.BytesIO(base64.b64decode(capture['data']))).convert('RGB')
    picture.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('report', help='a report.html written by run_demo.py')
    parser.add_argument('--screenshot', help='save the top of the report at the first width as this PNG file')
    parser.add_argument('--screenshot_height', type=int, default=2000,
                        help='CSS pixels of the page the screenshot shows (default: %(default)s)')
    args = parser.parse_args(argv)
    if not os.path.isfile(args.report):
        print(f'report_page.py: error: {args.report} is not a file', file=sys.stderr)
        return 1
    try:
        browser = page_driver.Browser()
    except LookupError as error:
        print(f'report_page.py: error: {error}', file=sys.stderr)
        return 1
    failed = False
    try:
        for width in WIDTHS:
            open_report(browser, args.report, width)
            found = layout(browser)
            print(f'{width} px: {found["words"]} words checked, page {found["height"]} px tall: '
                  + ('; '.join(found['problems']) or 'no word broken, nothing wider than the page'))
            failed = failed or bool(found['problems'])
            if args.screenshot and width == WIDTHS[0]:
                save_screenshot(browser, args.screenshot, width, min(args.screenshot_height, found['height']))
                print(f'Wrote {args.screenshot}')
    finally:
        browser.close()
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
