// Tick every `.live-timer` on the page from the server's clock (its `data-server-now`), not the browser's.
import { clockOffset, startTimers } from "./timers.js";

const now = document.querySelector("[data-server-now]")?.dataset.serverNow;
if (now) startTimers(document, clockOffset(now), ".live-timer");
