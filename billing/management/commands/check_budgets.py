"""`manage.py check_budgets`: email the budget warnings that are due (for cron; idempotent)."""

from __future__ import annotations

from django.core.management.base import BaseCommand

from billing.budgets import budget_alerts_send, budget_overview


class Command(BaseCommand):
    help = (
        "Check every client's budget for this month (paid-model cost and hours) and email the 80 % "
        "and 100 % warnings not sent yet. Each goes out once per client, month, measure and "
        "threshold, however often this runs; a paid turn's start checks the cost as well."
    )

    def handle(self, *args, **options) -> None:
        states = budget_overview()
        sent = 0
        for state in states:
            alerts = budget_alerts_send(state)
            sent += len(alerts)
            for alert in alerts:
                self.stdout.write(
                    f"Warned: {state.client_name} at {alert.threshold}% of its {alert.get_measure_display().lower()} budget."
                )
        levels = {"ok": 0, "warning": 0, "exceeded": 0}
        for state in states:
            levels[state.level] += 1
        self.stdout.write(
            f"Budgets: {len(states)} checked, {levels['warning']} over 80 %, {levels['exceeded']} used up; "
            f"{sent} warning(s) sent."
        )
