//! `tern throttle set|show`: the host's upload bandwidth schedule.

use std::process::ExitCode;

use anyhow::Result;
use clap::Subcommand;
use tern_engine::throttle::{parse_days, parse_hours, Limit};

use crate::{print_json, DataDirArg, GlobalArgs};

/// `tern throttle show --json` (docs/json.md).
#[derive(serde::Serialize)]
struct ThrottleReport {
    work_limit: String,
    off_limit: String,
    work_days: String,
    work_hours: String,
    /// The limit in force at this moment.
    now: String,
}

#[derive(Subcommand)]
pub enum ThrottleCommand {
    /// Set upload limits: one for work hours, one for the rest of the time. Running
    /// replications apply a change within a second.
    ///
    /// A RATE is a number of bits per second with a unit, decimal as network rates
    /// are (K = 1000, M = 1000000): 512Kbps, 50Mbps, 1.5Mbps, 1Gbps. Each limit must be
    /// from 512Kbps to 1023Mbps, or `unlimited`. Flags not given keep their value.
    ///
    /// Example: tern throttle set --work-limit 20Mbps --off-limit unlimited
    /// --work-days Mon-Fri --work-hours 08:00-18:00
    Set {
        /// Limit during work hours.
        #[arg(long, value_name = "RATE")]
        work_limit: Option<String>,
        /// Limit outside work hours.
        #[arg(long, value_name = "RATE")]
        off_limit: Option<String>,
        /// Same limit at all times (sets both).
        #[arg(long, value_name = "RATE", conflicts_with_all = ["work_limit", "off_limit"])]
        limit: Option<String>,
        /// Work days: a range (Mon-Fri), a list (Mon,Wed,Fri), both, or `none`.
        #[arg(long, value_name = "DAYS")]
        work_days: Option<String>,
        /// Work hours, local time of this host: HH:MM-HH:MM (may cross midnight).
        #[arg(long, value_name = "HH:MM-HH:MM")]
        work_hours: Option<String>,
        #[command(flatten)]
        data: DataDirArg,
    },
    /// Show the schedule and the limit in force now.
    Show {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        data: DataDirArg,
    },
}

pub fn run(g: &GlobalArgs, cmd: ThrottleCommand) -> Result<ExitCode> {
    match cmd {
        ThrottleCommand::Set { work_limit, off_limit, limit, work_days, work_hours, data } => {
            let engine = g.with(&data, None, None).engine()?;
            let mut s = engine.schedule()?;
            if let Some(l) = limit {
                let l = Limit::parse(&l)?;
                s.work_limit = l;
                s.off_limit = l;
            }
            if let Some(l) = work_limit {
                s.work_limit = Limit::parse(&l)?;
            }
            if let Some(l) = off_limit {
                s.off_limit = Limit::parse(&l)?;
            }
            if let Some(d) = work_days {
                s.work_days = parse_days(&d)?;
            }
            if let Some(h) = work_hours {
                (s.work_start_min, s.work_end_min) = parse_hours(&h)?;
            }
            engine.set_schedule(&s)?;
            outln!(
                "work hours {} on {}: {}; other times: {}",
                s.hours_text(),
                s.days_text(),
                s.work_limit,
                s.off_limit
            );
        }
        ThrottleCommand::Show { json, data } => {
            let engine = g.with(&data, None, None).engine_read_only()?;
            let s = engine.schedule()?;
            let now = engine.throttle().current_limit();
            if json {
                print_json(&ThrottleReport {
                    work_limit: s.work_limit.to_string(),
                    off_limit: s.off_limit.to_string(),
                    work_days: s.days_text(),
                    work_hours: s.hours_text(),
                    now: now.to_string(),
                })?;
            } else {
                outln!("work hours: {} on {}", s.hours_text(), s.days_text());
                outln!("work limit: {}", s.work_limit);
                outln!("off limit:  {}", s.off_limit);
                outln!("in force now: {now}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
