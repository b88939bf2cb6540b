import duckdb

from stats.views import views_sql, words_sql


def test_words_sql_counts_like_python_split():
    texts = [" a  b ", "a\tb", "a b c", "", None, "   ", "x", "a\nb c", "a\x0bb", "one two\r\nthree  ", "end."]
    con = duckdb.connect()
    got = [r[0] for r in con.execute(f"SELECT {words_sql('t')} FROM (SELECT unnest($1) AS t)", [texts]).fetchall()]
    assert got == [len(t.split()) if t else 0 for t in texts]


def test_views_sql_lists_missing_tables():
    text = views_sql([("a", "SELECT 1 AS x")], ["annotations"])
    assert "no view): annotations" in text and "CREATE OR REPLACE VIEW a AS\nSELECT 1 AS x;" in text
    con = duckdb.connect()
    con.execute(text)
    assert con.execute("SELECT x FROM a").fetchone() == (1,)
