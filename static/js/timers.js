// Live elapsed-time displays: <time data-timer-start="ISO" [data-timer-offset="ms"]>.
//
// The server's clock is the reference: pages pass the server's "now" so a skewed client
// clock does not show a wrong duration.

export function formatDuration(totalSeconds) {
  const seconds = Math.max(0, Math.floor(totalSeconds));
  const hours = Math.floor(seconds / 3600);
  const minutes = Math.floor((seconds % 3600) / 60);
  const secs = seconds % 60;
  return `${hours}:${String(minutes).padStart(2, "0")}:${String(secs).padStart(2, "0")}`;
}

// Milliseconds to add to Date.now() to get the server's time.
export function clockOffset(serverNowIso) {
  const serverNow = Date.parse(serverNowIso);
  return Number.isNaN(serverNow) ? 0 : serverNow - Date.now();
}

export function elapsedSeconds(startIso, offsetMs) {
  const start = Date.parse(startIso);
  if (Number.isNaN(start)) return 0;
  return (Date.now() + offsetMs - start) / 1000;
}

// Tick every element matching `selector` under `root` once a second; returns a stop function.
export function startTimers(root = document, offsetMs = 0, selector = "[data-timer-start]") {
  const tick = () => {
    for (const element of root.querySelectorAll(selector)) {
      if (element.dataset.timerStopped) continue;
      element.textContent = formatDuration(elapsedSeconds(element.dataset.timerStart, offsetMs));
    }
  };
  tick();
  const handle = setInterval(tick, 1000);
  return () => clearInterval(handle);
}
