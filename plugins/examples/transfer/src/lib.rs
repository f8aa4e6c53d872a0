//! The payment scenario's transfer message, `transfer_id|from|to|amount_cents`,
//! shared by the billing and points example plugins.

/// A parsed transfer, borrowing from the payload.
pub struct Transfer<'a> {
    pub transfer_id: &'a str,
    pub from: &'a str,
    pub to: &'a str,
    pub amount_cents: u64,
}

/// Parses `transfer_id|from|to|amount_cents`; the error says what is wrong.
pub fn parse(payload: &[u8]) -> Result<Transfer<'_>, String> {
    let text =
        std::str::from_utf8(payload).map_err(|e| format!("payload is not UTF-8 text: {e}"))?;
    let fields: Vec<&str> = text.split('|').collect();
    let [transfer_id, from, to, amount] = fields[..] else {
        return Err(format!(
            "expected 4 `|`-separated fields transfer_id|from|to|amount_cents, got {}",
            fields.len()
        ));
    };
    for (name, value) in [("transfer_id", transfer_id), ("from", from), ("to", to)] {
        if value.trim().is_empty() {
            return Err(format!("field `{name}` is empty"));
        }
    }
    let amount_cents = match amount.parse::<u64>() {
        Ok(n) if n > 0 && amount.bytes().all(|b| b.is_ascii_digit()) => n,
        _ => return Err(format!("amount_cents `{amount}` is not a positive integer")),
    };
    Ok(Transfer {
        transfer_id,
        from,
        to,
        amount_cents,
    })
}
