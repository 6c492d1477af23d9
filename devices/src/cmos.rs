//! The CMOS real-time clock at ports 0x70 (index) and 0x71 (data). It reports
//! the host's UTC time in BCD, 24-hour mode, and keeps the other bytes of CMOS
//! RAM as plain storage.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::bus::BusDevice;

pub const CMOS_PORT: u64 = 0x70;
pub const CMOS_PORT_LEN: u64 = 2;

const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_WEEKDAY: u8 = 0x06;
const REG_DAY: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_STATUS_A: u8 = 0x0a;
const REG_STATUS_B: u8 = 0x0b;
const REG_STATUS_D: u8 = 0x0d;
const REG_CENTURY: u8 = 0x32;
/// Status B: 24-hour mode, BCD values.
const STATUS_B_24H: u8 = 0x02;
/// Status D: the RTC's battery is good.
const STATUS_D_VALID: u8 = 0x80;

pub struct Cmos {
    index: u8,
    ram: [u8; 128],
}

impl Default for Cmos {
    fn default() -> Self {
        let mut ram = [0u8; 128];
        ram[REG_STATUS_B as usize] = STATUS_B_24H;
        ram[REG_STATUS_D as usize] = STATUS_D_VALID;
        Cmos { index: 0, ram }
    }
}

fn bcd(v: u64) -> u8 {
    (((v / 10) % 10) << 4 | (v % 10)) as u8
}

/// Splits days since 1970-01-01 into (year, month, day), proleptic Gregorian.
fn civil_from_days(days: i64) -> (i64, u64, u64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u64;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u64;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

impl Cmos {
    fn clock_register(&self, reg: u8) -> Option<u8> {
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let days = (secs / 86_400) as i64;
        let (year, month, day) = civil_from_days(days);
        let year = year.max(0) as u64;
        Some(match reg {
            REG_SECONDS => bcd(secs % 60),
            REG_MINUTES => bcd(secs / 60 % 60),
            REG_HOURS => bcd(secs / 3600 % 24),
            // 1970-01-01 was a Thursday; the RTC counts Sunday as 1.
            REG_WEEKDAY => bcd(((days + 4) % 7 + 1) as u64),
            REG_DAY => bcd(day),
            REG_MONTH => bcd(month),
            REG_YEAR => bcd(year % 100),
            REG_CENTURY => bcd(year / 100),
            // Never "update in progress".
            REG_STATUS_A => 0x26,
            _ => return None,
        })
    }
}

impl BusDevice for Cmos {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            1 => self
                .clock_register(self.index)
                .unwrap_or(self.ram[self.index as usize]),
            _ => 0xff,
        };
        data.fill(value);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&b) = data.first() else { return };
        match offset {
            // Bit 7 of the index port is the NMI mask; it is not an index bit.
            0 => self.index = b & 0x7f,
            _ => {
                if self.clock_register(self.index).is_none() {
                    self.ram[self.index as usize] = b;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_convert() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }

    #[test]
    fn reads_bcd_time_and_keeps_ram() {
        let mut c = Cmos::default();
        let mut b = [0u8];
        c.write(0, &[REG_CENTURY | 0x80]);
        c.read(1, &mut b);
        assert_eq!(b[0], 0x20);
        c.write(0, &[REG_MONTH]);
        c.read(1, &mut b);
        assert!((0x01..=0x12).contains(&b[0]) && b[0] & 0x0f <= 9);
        c.write(0, &[0x40]);
        c.write(1, &[0x5a]);
        c.read(1, &mut b);
        assert_eq!(b[0], 0x5a);
    }
}
