from django.db import connection


def test_the_six_design_tables_exist(db):
    tables = set(connection.introspection.table_names())
    assert {
        "ollama_streaming_sessions",
        "ollama_session_messages",
        "ollama_context_streams",
        "domain_portfolio",
        "user_brands",
        "user_llm_usage",
    } <= tables
