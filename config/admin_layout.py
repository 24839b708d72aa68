"""Admin changelists too wide for the page: the usage ledger, work sessions, session messages.

At 1440 px, with Django's navigation sidebar and the filter column both open, about 800 px are
left for a table of a dozen columns, so the last ones (cost, status) end up outside the frame.
These changelists leave the navigation sidebar out (the header and breadcrumbs still lead
everywhere) and use compact cells (static/css/admin-changelists.css); on a narrower screen the
table scrolls inside its frame instead of being cut off.
"""

from __future__ import annotations

from django.contrib import admin


class WideChangelist(admin.ModelAdmin):
    """Mix into a ModelAdmin whose changelist has many columns."""

    class Media:
        css = {"all": ["css/admin-changelists.css"]}

    def changelist_view(self, request, extra_context=None):
        return super().changelist_view(request, {"is_nav_sidebar_enabled": False, **(extra_context or {})})
