"""Supervision of the MQTT link thread: an edge of the control loop.

The link thread (:class:`firmware.net.mqtt.MqttLink`) counts a heartbeat,
``beat``, on every loop and on every bounded socket wait. :class:`LinkWatch`
runs on the control thread after each tick: when the thread has died
(``running`` is False) or its heartbeat has not moved for :data:`HANG_MS`,
it abandons that link and starts a new one. The charger's connectivity
watchdog (C4) never depends on any of this: it lives in the safety core and
falls back to the offline current on time whatever the link does.
"""

MAX_HUNG = 3
"""Hung link threads abandoned before the watch asks for a reboot (when no car
charges): each one keeps its stack (16 KB on the ESP32) and its socket."""
HANG_MS = 60000
"""A link thread whose heartbeat has not moved this long is hung, ms. Every
socket call is bounded by the link's I/O timeout (15 s) and beats while it
waits, so only a call that blocks outside those bounds (a DNS lookup that
never answers, a driver stuck) gets this far."""


class LinkWatch:
    """Restarts the link of ``bridge`` (:class:`firmware.net.bridge.ServerBridge`)
    when its thread is dead or hung.

    ``make_link()`` returns a new, unstarted link; ``clock`` gives ticks;
    ``log(text)``; ``hang_ms`` (see :data:`HANG_MS`); ``spawn`` (the thread
    starter, for tests). Public: ``restarts`` (count).
    """

    def __init__(self, bridge, make_link, clock, log, hang_ms=HANG_MS, spawn=None):
        self.bridge = bridge
        self.make_link = make_link
        self.clock = clock
        self.log = log
        self.hang_ms = hang_ms
        self.spawn = spawn
        self.restarts = 0
        self.hung = 0
        self._beat = None
        self._beat_at = clock.ticks_ms()

    def poll(self):
        """Check the link once (no allocation while it is healthy). Raises
        what a failed thread start raises: the edge boundary retries."""
        link = self.bridge.link
        if link is None:
            return False
        now = self.clock.ticks_ms()
        if link.beat != self._beat:
            self._beat = link.beat
            self._beat_at = now
            if link.running:
                return False
        if not link.running:
            self._restart(link, "the link thread ended")
        elif self.clock.ticks_diff(now, self._beat_at) >= self.hang_ms:
            self.hung += 1
            if self.hung >= MAX_HUNG:
                self.log("mqtt link hung %d times: reboot once no car charges" % self.hung)
                self.bridge.reboot_when_idle()
            self._restart(link, "the link thread is hung (no heartbeat for %d s)"
                          % (self.hang_ms // 1000))
        return False

    def _restart(self, old, why):
        self.restarts += 1
        self.log("mqtt link restarted (%d so far): %s" % (self.restarts, why))
        old.abandon()
        new = self.make_link()
        self.bridge.link = new
        self._beat = None
        self._beat_at = self.clock.ticks_ms()
        new.start(self.spawn)
