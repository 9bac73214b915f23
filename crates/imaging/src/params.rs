//! Parsing of request parameters into typed values, with messages that name the field.
//! Pure functions (no I/O), so they can be unit-tested and fuzzed directly.

use serde_json::Value;

use crate::composite::{GradeTarget, Grading, Settings};

/// A request field that was missing or out of range.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("request body is not valid JSON for this route: {0}")]
    MalformedJson(String),
    #[error("'{field}' {reason}")]
    InvalidField { field: &'static str, reason: String },
    #[error("'{0}' is required")]
    MissingField(&'static str),
    #[error("upload is larger than the {limit_mb} MB limit")]
    TooLarge { limit_mb: u64 },
    #[error("malformed form data: {0}")]
    MalformedForm(String),
}

impl InputError {
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        InputError::InvalidField { field, reason: reason.into() }
    }
}

/// The box of `/generate_mask`: `{x_min, y_min, x_max, y_max}` as numbers (numeric
/// strings are accepted too, as old clients send them). Returns `[x_min, y_min, x_max, y_max]`.
pub fn parse_box(body: &[u8]) -> Result<[f64; 4], InputError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| InputError::MalformedJson(e.to_string()))?;
    if !value.is_object() {
        return Err(InputError::MalformedJson("expected a JSON object with x_min, y_min, x_max, y_max".into()));
    }
    let field = |name: &'static str| -> Result<f64, InputError> {
        let v = value.get(name).ok_or(InputError::MissingField(name))?;
        let number = match v {
            Value::Number(n) => n.as_f64(),
            Value::String(s) => s.trim().parse::<f64>().ok(),
            _ => None,
        };
        match number {
            Some(n) if n.is_finite() && n.abs() <= 1e9 => Ok(n),
            _ => Err(InputError::invalid(name, "must be a finite number (pixels of the working image)")),
        }
    };
    Ok([field("x_min")?, field("y_min")?, field("x_max")?, field("y_max")?])
}

/// The text fields of `/replace_product`, as received.
#[derive(Debug, Default, Clone, Copy)]
pub struct ReplaceFields<'a> {
    pub scale_factor: Option<&'a str>,
    pub use_blending: Option<&'a str>,
    pub feather_amount: Option<&'a str>,
    pub enable_color_grading: Option<&'a str>,
    pub color_grade_strength: Option<&'a str>,
    pub grading_method: Option<&'a str>,
}

// Absent fields take the Flask server's defaults, so a script written against it gets
// the same picture: blending on, 15 px feathering, grading on at strength 0.5.
pub const DEFAULT_SCALE: f32 = 1.0;
pub const DEFAULT_FEATHER: u32 = 15;
pub const DEFAULT_GRADING: bool = true;
/// A fraction 0–1 on the wire, as the Flask client sends its slider's value.
pub const DEFAULT_STRENGTH: f32 = 0.5;

/// Validates the replacement settings; absent fields take their defaults.
pub fn parse_settings(fields: &ReplaceFields<'_>) -> Result<Settings, InputError> {
    let scale_factor = number(fields.scale_factor, "scale_factor", DEFAULT_SCALE, (0.5, 2.0))?;
    let use_blending = boolean(fields.use_blending, "use_blending", true)?;
    let feather = number(fields.feather_amount, "feather_amount", DEFAULT_FEATHER as f32, (0.0, 30.0))?;
    let grading_on = boolean(fields.enable_color_grading, "enable_color_grading", DEFAULT_GRADING)?;
    let strength = number(fields.color_grade_strength, "color_grade_strength", DEFAULT_STRENGTH, (0.0, 1.0))?;
    let target = grading_target(fields.grading_method)?;
    Ok(Settings {
        scale_factor,
        use_blending,
        feather_amount: feather.round() as u32,
        grading: grading_on.then_some(Grading { target, strength }),
    })
}

fn present(value: Option<&str>) -> Option<&str> {
    value.map(str::trim).filter(|v| !v.is_empty())
}

fn number(value: Option<&str>, field: &'static str, default: f32, range: (f32, f32)) -> Result<f32, InputError> {
    let Some(text) = present(value) else {
        return Ok(default);
    };
    match text.parse::<f32>() {
        Ok(v) if v.is_finite() && v >= range.0 && v <= range.1 => Ok(v),
        _ => Err(InputError::invalid(field, format!("must be a number from {} to {}", range.0, range.1))),
    }
}

fn boolean(value: Option<&str>, field: &'static str, default: bool) -> Result<bool, InputError> {
    let Some(text) = present(value) else {
        return Ok(default);
    };
    match text.to_ascii_lowercase().as_str() {
        "true" | "1" | "on" | "yes" => Ok(true),
        "false" | "0" | "off" | "no" => Ok(false),
        _ => Err(InputError::invalid(field, "must be true or false")),
    }
}

fn grading_target(value: Option<&str>) -> Result<GradeTarget, InputError> {
    match present(value) {
        None | Some("Match Target Area") => Ok(GradeTarget::MaskedArea),
        Some("Match Entire Image") => Ok(GradeTarget::WholeImage),
        Some(_) => {
            Err(InputError::invalid("grading_method", "must be \"Match Target Area\" or \"Match Entire Image\""))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn box_fields_are_checked_by_name() {
        assert_eq!(parse_box(br#"{"x_min":1,"y_min":2,"x_max":"3","y_max":4.5}"#).unwrap(), [1.0, 2.0, 3.0, 4.5]);
        let missing = parse_box(br#"{"x_min":1,"y_min":2,"x_max":3}"#).unwrap_err();
        assert!(missing.to_string().contains("y_max"));
        let bad = parse_box(br#"{"x_min":"a","y_min":2,"x_max":3,"y_max":4}"#).unwrap_err();
        assert!(bad.to_string().contains("x_min"));
        assert!(matches!(parse_box(b"{not json"), Err(InputError::MalformedJson(_))));
        assert!(matches!(parse_box(b"[1,2,3,4]"), Err(InputError::MalformedJson(_))));
        assert!(parse_box(br#"{"x_min":1e300,"y_min":2,"x_max":3,"y_max":4}"#).is_err());
    }

    #[test]
    fn settings_defaults_and_ranges() {
        let s = parse_settings(&ReplaceFields::default()).unwrap();
        assert_eq!(s.scale_factor, 1.0);
        assert!(s.use_blending);
        assert_eq!(s.feather_amount, 15, "the Flask server's default");
        assert_eq!(s.grading, Some(Grading { target: GradeTarget::MaskedArea, strength: 0.5 }));
        let off = parse_settings(&ReplaceFields { enable_color_grading: Some("false"), ..Default::default() });
        assert!(off.unwrap().grading.is_none());
        let graded = parse_settings(&ReplaceFields {
            enable_color_grading: Some("true"),
            color_grade_strength: Some("0.25"),
            grading_method: Some("Match Entire Image"),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(graded.grading, Some(Grading { target: GradeTarget::WholeImage, strength: 0.25 }));
        for (fields, name) in [
            (ReplaceFields { scale_factor: Some("3"), ..Default::default() }, "scale_factor"),
            (ReplaceFields { scale_factor: Some("NaN"), ..Default::default() }, "scale_factor"),
            (ReplaceFields { feather_amount: Some("-1"), ..Default::default() }, "feather_amount"),
            (ReplaceFields { use_blending: Some("maybe"), ..Default::default() }, "use_blending"),
            (ReplaceFields { color_grade_strength: Some("1.01"), ..Default::default() }, "color_grade_strength"),
            (ReplaceFields { color_grade_strength: Some("50"), ..Default::default() }, "color_grade_strength"),
            (ReplaceFields { grading_method: Some("Match Nothing"), ..Default::default() }, "grading_method"),
        ] {
            let err = parse_settings(&fields).unwrap_err().to_string();
            assert!(err.contains(name), "{err} should name {name}");
        }
    }
}
