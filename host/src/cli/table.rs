//! Plain-text tables for people: left-aligned columns as wide as their widest cell, two spaces apart.
//! Hand-aligned rather than a table crate: the CLI needs nothing more.

/// Renders `headers` and `rows`; the last column is not padded, each line ends with `\n`.
pub(crate) fn render_table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>, out: &mut String| {
        let last = cells.len().saturating_sub(1);
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i == last {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  "));
            }
        }
        out.push('\n');
    };
    let mut out = String::new();
    line(headers.to_vec(), &mut out);
    for row in rows {
        line(row.iter().map(String::as_str).collect(), &mut out);
    }
    out
}

/// Prints a table on stdout.
pub(crate) fn print_table(headers: &[&str], rows: Vec<Vec<String>>) {
    print!("{}", render_table(headers, &rows));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_are_as_wide_as_their_widest_cell() {
        let rows = vec![
            vec!["counter".to_string(), "12".to_string(), "x".to_string()],
            vec!["c".to_string(), "3".to_string(), "longer".to_string()],
        ];
        assert_eq!(
            render_table(&["NAME", "N", "LAST"], &rows),
            "NAME     N   LAST\ncounter  12  x\nc        3   longer\n"
        );
    }
}
