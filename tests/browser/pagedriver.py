"""What a person does with the fleet page, as Selenium calls: open it, log in, read the table,
open a Pi, run a command. Waits are explicit (the page updates itself from the changes feed)."""
from __future__ import annotations

from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

WAIT = 30.0       # the daemons write their status within 2 s; a CouchDB under load takes longer


class FleetPage:
    def __init__(self, driver: WebDriver, url: str) -> None:
        self.driver = driver
        self.url = url

    # ---- waiting ----

    def until(self, condition, message: str, timeout: float = WAIT):
        """condition(driver) -> truthy; stale elements (the page redrew) count as not yet."""
        def safe(driver):
            try:
                return condition(driver)
            except StaleElementReferenceException:
                return False
        return WebDriverWait(self.driver, timeout, poll_frequency=0.1).until(safe, message)

    def visible(self, element_id: str) -> bool:
        elements = self.driver.find_elements(By.ID, element_id)
        return bool(elements) and elements[0].is_displayed()

    def wait_visible(self, element_id: str, timeout: float = WAIT) -> WebElement:
        self.until(lambda d: self.visible(element_id), f"#{element_id} to show", timeout)
        return self.driver.find_element(By.ID, element_id)

    def text(self, element_id: str) -> str:
        return self.driver.find_element(By.ID, element_id).text

    def wait_text(self, element_id: str, needle: str, timeout: float = WAIT) -> str:
        return self.until(lambda d: (lambda t: t if needle in t else False)(self.text(element_id)),
                          f"{needle!r} in #{element_id}", timeout)

    # ---- session ----

    def open(self, fragment: str = "") -> None:
        self.driver.get(self.url + (f"#{fragment}" if fragment else ""))

    def log_in(self, user: str, password: str) -> None:
        self.wait_visible("login")
        name = self.driver.find_element(By.ID, "login-name")
        name.clear()
        name.send_keys(user)
        self.driver.find_element(By.ID, "login-password").send_keys(password)
        self.driver.find_element(By.ID, "login-submit").click()
        self.until(lambda d: user in self.text("who"), f"{user} logged in")

    def log_out(self) -> None:
        self.driver.find_element(By.ID, "logout").click()
        self.wait_visible("login")

    def session_user(self):
        """Who the server says is logged in, asked from inside the page (its cookie)."""
        return self.driver.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "const root = window.HimbeereFleet.locate(location.pathname).root;"
            "fetch(root + '/_session', {credentials: 'same-origin'}).then(r => r.json())"
            ".then(s => done(s.userCtx.name), e => done('error: ' + e));")

    # ---- the fleet view ----

    def rows(self) -> dict[str, dict[str, str]]:
        """The fleet table: MacID -> {column key: cell text}."""
        heads = [th.get_attribute("data-key") for th in self.driver.find_elements(By.CSS_SELECTOR, "#fleet-head th")]
        table = {}
        for tr in self.driver.find_elements(By.CSS_SELECTOR, "#fleet-body tr"):
            cells = [td.get_attribute("textContent").strip() for td in tr.find_elements(By.TAG_NAME, "td")]
            table[tr.get_attribute("data-macid")] = dict(zip(heads, cells)) | {"_state": tr.get_attribute("data-state")}
        return table

    def order(self) -> list[str]:
        return [tr.get_attribute("data-macid") for tr in self.driver.find_elements(By.CSS_SELECTOR, "#fleet-body tr")]

    def wait_rows(self, check, message: str, timeout: float = WAIT) -> dict:
        return self.until(lambda d: (lambda rows: rows if check(rows) else False)(self.rows()), message, timeout)

    def sort_by(self, key: str) -> None:
        self.driver.find_element(By.CSS_SELECTOR, f'#fleet-head th[data-key="{key}"] button').click()

    def filter(self, text: str) -> None:
        box = self.driver.find_element(By.ID, "filter")
        box.clear()
        box.send_keys(text)

    # ---- the Pi view ----

    def open_pi(self, macid: int | str) -> None:
        self.driver.find_element(By.CSS_SELECTOR, f'#fleet-body tr[data-macid="{macid}"] td:nth-child(2)').click()
        self.wait_visible("pi")
        self.wait_text("pi-title", str(macid))

    def programs(self) -> dict[str, list[str]]:
        table = {}
        for tr in self.driver.find_elements(By.CSS_SELECTOR, "#pi-programs-body tr[data-program]"):
            cells = [td.get_attribute("textContent").strip() for td in tr.find_elements(By.TAG_NAME, "td")]
            table[cells[0]] = cells[1:]
        return table

    def output(self, program_id: str) -> str:
        parts = self.driver.find_elements(By.CSS_SELECTOR, f'#pi-output details[data-program="{program_id}"]')
        return parts[0].get_attribute("textContent") if parts else ""

    def run_command(self, words: str, timeout: str = "") -> None:
        box = self.driver.find_element(By.ID, "cmd-argv")
        box.clear()
        box.send_keys(words)
        if timeout:
            self.driver.find_element(By.ID, "cmd-timeout").send_keys(timeout)
        self.driver.find_element(By.ID, "cmd-run").click()

    def commands(self) -> list[dict[str, str]]:
        found = []
        for li in self.driver.find_elements(By.CSS_SELECTOR, "#pi-commands > li"):
            def part(css: str) -> str:
                items = li.find_elements(By.CSS_SELECTOR, css)
                return items[0].get_attribute("textContent") if items else ""
            found.append({"id": li.get_attribute("data-id"), "state": li.get_attribute("data-state"),
                          "argv": part(".argv"), "outcome": part(".outcome"),
                          "stdout": part("pre.stdout"), "stderr": part("pre.stderr")})
        return found
